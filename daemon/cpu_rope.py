"""RoPE on MLX's CPU backend: the same arithmetic, its sines and cosines computed once a pass.

MLX has no CPU kernel for `mx.fast.rope`: on a CPU stream it runs its fallback, a graph of
~15 small ops that computes the angles, their cosines and sines and then the rotation. mlx-lm
calls it twice per layer (queries, keys), so a pass of a 30-layer model builds and runs that
graph 60 times over the same positions: ~45-85 us per call on a 2-core EPYC against ~5 us
for one elementwise op, 3-5 ms of a 30-45 ms pass.

`rope` computes the fallback's tables (`cos(theta)`, `sin(theta)` in the input's dtype) once
per (positions, dims, base or freqs, scale, dtype) and keeps the last few, then applies the
fallback's own rotation ops to each input. The ops and their order are MLX's (mlx/fast.cpp,
`rope`'s fallback), so the output is bit-identical to `mx.fast.rope`'s and so are its
gradients (tests/test_cpu_rope.py): nothing computes another function, in this process or
between this one and another. Tables are kept only where the offset's value can be keyed:
an int, or an array `positions()` made (the batched forward's per-token positions). Any other
array offset may be updated in place under the same object (mlx-lm's BatchKVCache does
`offset += n`), so its tables are made afresh in the caller's graph, as MLX does. Kept tables
depend on no input and are evaluated when made, so they are constants any later call can use,
inside `mx.compile` or not (where a transformation refuses the eval, the call goes to MLX's
own). Anything this does not cover (a GPU stream, a Metal device, an offset MLX would refuse) goes
to MLX's own too. `SPECLORA_CPU_ROPE=0` turns it off.

Kept tables are made on a stream of their own (one per thread): an eval on the caller's stream
would first wait for every pass queued there, and mlx-lm's generate_step and the worker queue
the next pass (async_eval) before they build the one after it.

Measured (embedded model, MLX's RoPE and this alternating in one process; the closing note of
the change): one pass at 200 tokens of context, 1 token 40.3 -> 36.0 ms, 5 tokens 47.2 ->
45.6, 17 tokens 93.7 -> 89.8; mlx-lm's generate_step, 64 tokens after a 300-token prompt,
25.4 -> 28.7 tokens/s (8 pairs, ratio 0.90-1.46, median 1.07).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np

_TABLES_KEPT = 16  # a pass needs one entry (two with a separately shaped draft); rounds vary

_original: Any = None
_stream: Any = None  # the tables' stream, one per thread (_table_stream)
_installed: bool | None = None
_tables: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}
_positions: dict[int, Any] = {}  # id -> the arrays positions() made (kept while listed)
_lock = threading.Lock()


def _inverse_frequencies(mx: Any, dims: int, base: float, freqs: Any) -> Any:
    half = dims // 2
    if freqs is not None:
        return mx.reciprocal(freqs.astype(mx.float32))
    # MLX computes std::log(base) / half_dims in float: base is a float, so is log's result.
    step = np.float32(np.float32(math.log(np.float32(base))) / np.float32(half))
    return mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(step, mx.float32))


def _make_tables(
    mx: Any, dims: int, base: float, scale: float, offset: Any, length: int, dtype: Any, freqs: Any
) -> tuple[Any, Any]:
    """The fallback's coss and sins (lazy): (length, dims/2) for a scalar offset, (B, 1,
    length, dims/2) for one offset per batch row."""
    if not isinstance(offset, mx.array):
        offset = mx.array(offset, mx.int32)
    elif offset.size > 1:  # one per batch row
        offset = mx.expand_dims(offset, (-1, -2))
    if offset.dtype.size != 4:
        offset = offset.astype(mx.int32)
    positions = (mx.arange(length, dtype=mx.float32) + offset) * mx.array(scale, mx.float32)
    theta = mx.expand_dims(positions, -1) * _inverse_frequencies(mx, dims, base, freqs)
    return mx.cos(theta).astype(dtype), mx.sin(theta).astype(dtype)


def positions(values: list[int]) -> Any:
    """An int32 array of per-row RoPE offsets that `rope` may key its tables by: this module
    made it and nobody updates it in place. (Any other array offset may be: mlx-lm's
    BatchKVCache does `offset += n`, the same object with a new value, so `rope` makes its
    tables afresh for those, in the caller's graph.)"""
    import mlx.core as mx

    made = mx.array(values, mx.int32)
    with _lock:
        if len(_positions) >= _TABLES_KEPT:
            _positions.clear()
        _positions[id(made)] = made
    return made


def _table_stream(mx: Any) -> Any:
    global _stream
    if _stream is None:
        _stream = mx.new_thread_local_stream(mx.cpu)
    return _stream


def _tables_for(
    mx: Any, dims: int, base: float, scale: float, offset: Any, length: int, dtype: Any, freqs: Any
) -> tuple[Any, Any]:
    """The tables, kept for the next call with the same key where the offset's value can be
    keyed: an int, or an array `positions` made (its identity stands for its value; the entry
    keeps the array, so the id stays its). Kept tables are evaluated on a stream of their own:
    an eval on the caller's stream would wait for everything queued there before it (mlx-lm's
    generate_step queues the next pass before it builds the one after; the worker queues plain
    passes), which would undo that overlap."""
    if isinstance(offset, int):
        offset_key: Any = offset
    else:
        with _lock:
            known = _positions.get(id(offset)) is offset
        if not known:  # its value may change under the same object: not kept
            return _make_tables(mx, dims, base, scale, offset, length, dtype, freqs)
        offset_key = ("positions", id(offset))
    freqs_key = None if freqs is None else id(freqs)
    key = (dims, base, scale, offset_key, length, dtype, freqs_key)
    with _lock:
        hit = _tables.get(key)
    if hit is not None:
        return hit[0], hit[1]
    with mx.stream(_table_stream(mx)):
        coss, sins = _make_tables(mx, dims, base, scale, offset, length, dtype, freqs)
        mx.eval(coss, sins)  # constants from here on (see the module docstring)
    with _lock:
        if len(_tables) >= _TABLES_KEPT:
            _tables.clear()
        _tables[key] = (coss, sins, (offset, freqs))
    return coss, sins


def _rotate(mx: Any, x: Any, dims: int, traditional: bool, coss: Any, sins: Any) -> Any:
    """The fallback's rotation of x, shaped (B, N, T, D), by its tables."""
    b, n, t, d = x.shape
    if traditional:
        x1 = x[..., 0:dims:2]
        x2 = x[..., 1:dims:2]
    else:
        x1 = x[..., : dims // 2]
        x2 = x[..., dims // 2 : dims]
    outs = [x1 * coss - x2 * sins, x1 * sins + x2 * coss]
    if traditional:
        out = mx.concatenate([mx.expand_dims(o, -1) for o in outs], -1).reshape(b, n, t, dims)
        return out if dims == d else mx.concatenate([out, x[..., dims:]], -1)
    if dims < d:
        outs.append(x[..., dims:])
    return mx.concatenate(outs, -1)


def rope(
    a: Any,
    dims: int,
    *,
    traditional: bool,
    base: float | None,
    scale: float,
    offset: Any,
    freqs: Any = None,
    stream: Any = None,
) -> Any:
    """mx.fast.rope, bit for bit, with the tables shared between calls (module docstring)."""
    import mlx.core as mx

    def mlx_own() -> Any:
        return _original(
            a,
            dims,
            traditional=traditional,
            base=base,
            scale=scale,
            offset=offset,
            freqs=freqs,
            stream=stream,
        )

    if stream is not None or not isinstance(a, mx.array) or a.ndim < 3:
        return mlx_own()
    if (base is None) == (freqs is None) or dims <= 0 or dims % 2 or dims > a.shape[-1]:
        return mlx_own()  # MLX's own errors
    if not mx.issubdtype(a.dtype, mx.floating):
        return mlx_own()
    if isinstance(offset, mx.array):
        if offset.ndim > 1 or offset.size not in (1, a.shape[0]):
            return mlx_own()
        if not mx.issubdtype(offset.dtype, mx.integer):
            return mlx_own()
    elif not isinstance(offset, int) or isinstance(offset, bool):
        return mlx_own()
    if freqs is not None and (freqs.ndim != 1 or freqs.shape[0] != dims // 2):
        return mlx_own()

    shape = a.shape
    x = a
    if x.ndim == 3:
        x = mx.expand_dims(x, 1)
    elif x.ndim > 4:
        x = mx.flatten(x, 1, x.ndim - 3)
    try:
        coss, sins = _tables_for(
            mx, dims, 1.0 if base is None else base, scale, offset, x.shape[2], a.dtype, freqs
        )
    except (ValueError, RuntimeError):  # a transformation that refuses the eval
        return mlx_own()
    out = _rotate(mx, x, dims, traditional, coss, sins)
    return out if x is a else out.reshape(shape)


def install() -> bool:
    """Route MLX's CPU RoPE through `rope`; idempotent; not on a Metal device or with
    SPECLORA_CPU_ROPE=0. True when installed."""
    global _installed, _original
    if _installed is not None:
        return _installed
    import mlx.core as mx

    if os.environ.get("SPECLORA_CPU_ROPE", "1") == "0" or mx.metal.is_available():
        _installed = False
        return False
    _original = mx.fast.rope
    mx.fast.rope = rope
    _installed = True
    return True


def installed() -> bool:
    return bool(_installed)

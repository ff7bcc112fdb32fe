"""Memory housekeeping for a long-running daemon: MLX's buffer cache and the C heap.

MLX keeps freed buffers in a cache for reuse; left unbounded it settles at tens of MiB on the
embedded model (27-31 MiB measured), which on a CPU buys no measurable speed (an A/B of cache
limits 0, 4, 16 MiB and unbounded moved tokens/s by less than the run-to-run noise). glibc
likewise keeps freed heap pages; `malloc_trim` hands them back after a burst of requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable

# Used when models.buffer_cache_mb is null and MLX runs on the CPU: room for one step's small
# buffers (logits of a verify pass are ~1 MiB on a 49k vocabulary).
CPU_BUFFER_CACHE_MB = 8


def limit_buffer_cache(configured_mb: int | None) -> int | None:
    """Cap MLX's buffer cache. None keeps MLX's own limit on a Metal GPU (allocating GPU buffers
    is costly) and uses CPU_BUFFER_CACHE_MB on the CPU. Returns the limit set, in MiB."""
    import mlx.core as mx

    mb = configured_mb
    if mb is None:
        if mx.metal.is_available():
            return None
        mb = CPU_BUFFER_CACHE_MB
    mx.set_cache_limit(mb << 20)
    return mb


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None  # macOS's allocator returns free pages by itself
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


def release_free_memory() -> None:
    """Return MLX's cached buffers and the heap's free pages to the OS (e.g. when idle)."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

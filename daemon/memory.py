"""Memory housekeeping for a long-running daemon: MLX's buffer cache and the C heap.

MLX keeps freed buffers in a cache for reuse; left unbounded it settles at tens of MiB on the
embedded model (27-31 MiB measured), which on a CPU buys no measurable speed (an A/B of cache
limits 0, 4, 16 MiB and unbounded moved tokens/s by less than the run-to-run noise), so on a
CPU it is capped; on Metal MLX's own limit stays, because allocating GPU buffers is costly.
The worker keeps what is cached while it serves and hands it back, with the heap's free pages
(`malloc_trim`), only after IDLE_RELEASE_S without work or when the system runs low on memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable

# Used when models.buffer_cache_mb is null and MLX runs on the CPU: room for one step's small
# buffers (logits of a verify pass are ~1 MiB on a 49k vocabulary).
CPU_BUFFER_CACHE_MB = 8
# Seconds without work after which the worker empties the buffer cache and trims the heap.
IDLE_RELEASE_S = 60.0
# Below this fraction of the machine's memory available, the cache is emptied after each burst.
PRESSURE_AVAILABLE_FRACTION = 0.10


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


def available_memory_fraction() -> float | None:
    """The machine's available memory as a fraction of its total; None where unknown."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                fields = {k: v for k, _, v in (line.partition(":") for line in f)}
            total = int(fields["MemTotal"].split()[0])
            return int(fields["MemAvailable"].split()[0]) / total if total else None
        except (OSError, KeyError, ValueError, IndexError):
            return None
    if sys.platform == "darwin":
        try:
            total = os.sysconf("SC_PHYS_PAGES")
            free = _darwin_sysctl_int("vm.page_free_count") + _darwin_sysctl_int(
                "vm.page_purgeable_count"
            )
            return free / total if total > 0 else None
        except (OSError, ValueError, AttributeError):
            return None
    return None


def _darwin_sysctl_int(name: str) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    value = ctypes.c_uint32(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        raise OSError(f"sysctl {name} failed")
    return int(value.value)


def under_memory_pressure(threshold: float = PRESSURE_AVAILABLE_FRACTION) -> bool:
    """True when the machine has less than `threshold` of its memory available."""
    fraction = available_memory_fraction()
    return fraction is not None and fraction < threshold


def release_free_memory() -> None:
    """Return MLX's cached buffers and the heap's free pages to the OS (e.g. when idle)."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

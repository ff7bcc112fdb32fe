"""Memory housekeeping for a long-running daemon: MLX's buffer cache and the C heap.

MLX keeps freed buffers in a cache for reuse; left unbounded it settles at tens of MiB on the
embedded model (27-31 MiB measured), which on a CPU buys no measurable speed (an A/B of cache
limits 0, 4, 16 MiB and unbounded moved tokens/s by less than the run-to-run noise), so on a
CPU it is capped; on Metal MLX's own limit stays, because allocating GPU buffers is costly.
The worker keeps what is cached while it serves and hands it back, with the heap's free pages
(`malloc_trim`), only after IDLE_RELEASE_S without work or when the system runs low on memory.

Beyond MLX's cache, buffers MLX frees go back to the C allocator, and with glibc's defaults
they stay in the process. glibc serves a request of at least its mmap threshold with its own
mapping (unmapped on free), and raises that threshold to the size of every mapped chunk freed,
up to 32 MiB: loading the weights frees multi-MiB tensors, after which every KV-cache, logits
and activation buffer comes from the heap or a per-thread arena, and the holes they leave when
freed are kept resident. On the embedded pair that was ~60 MiB of RSS after a few requests
(788 MiB resident for 567 MiB of live MLX arrays) and ~20 MiB of the peak; a serving thread's
arena alone held 63 MiB. `tune_malloc` pins the threshold at glibc's own starting value and caps
the arenas, once, at daemon start, before any model is loaded or any thread starts.

One buffer must stay on the heap all the same: OpenBLAS's threaded driver mallocs and frees a
512 KiB job table inside every product it splits across threads (daemon/blas.py), hundreds of
times per decoding step. Mapped, each was an mmap and a munmap (a TLB shootdown across the BLAS
threads): the daemon decoded ~9% slower than the same engine in a process with glibc's defaults.
So the threshold sits just above that table, and the trim threshold at twice it (glibc's own
rule when it raises the threshold), so a table freed at the heap's top is not handed back to
the OS at every product either. Buffers between 128 KiB and the table's size then come from
the heap too, and the worker trims it after every round of steps (`trim_heap`), which kept the
daemon's peak RSS where the 128 KiB threshold had it (790-791 MiB against 795-796 without the
trim, 8 clients) at no measurable cost in speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable, Mapping

# Used when models.buffer_cache_mb is null and MLX runs on the CPU: room for one step's small
# buffers (logits of a verify pass are ~1 MiB on a 49k vocabulary).
CPU_BUFFER_CACHE_MB = 8
# Seconds without work after which the worker empties the buffer cache and trims the heap.
IDLE_RELEASE_S = 60.0
# Below this fraction of the machine's memory available, the cache is emptied after each burst.
PRESSURE_AVAILABLE_FRACTION = 0.10
# glibc mallopt parameters (malloc.h) and the values the daemon sets (tune_malloc).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# glibc's initial mmap threshold; setting it explicitly turns the dynamic raise off. A buffer
# at least the threshold (this, or just above the BLAS's per-product buffer: mmap_threshold)
# gets its own mapping, returned on free; MLX's buffer cache still reuses recent ones without a
# syscall.
MMAP_THRESHOLD_BYTES = 128 << 10
# The most glibc accepts (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
MMAP_THRESHOLD_MAX_BYTES = 32 << 20
PAGE_BYTES = 4096  # room for malloc's chunk header above a buffer that must stay on the heap
# Threads that allocate share this many arenas (the main heap included). Python's threads take
# the GIL to allocate anyway; MLX's large buffers are mapped, not taken from an arena.
ARENA_MAX = 2


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


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return None
    if fn is None or _malloc_trim() is None:  # malloc_trim is glibc's; musl has mallopt as a stub
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def mmap_threshold(heap_buffer_bytes: int = 0) -> int:
    """The threshold tune_malloc sets: glibc's starting value, or just above a buffer that is
    allocated and freed too often to map (`heap_buffer_bytes`), within glibc's ceiling."""
    return min(max(MMAP_THRESHOLD_BYTES, heap_buffer_bytes + PAGE_BYTES), MMAP_THRESHOLD_MAX_BYTES)


def tune_malloc(env: Mapping[str, str] | None = None, heap_buffer_bytes: int = 0) -> dict[str, int]:
    """Keep freed buffers from staying resident (glibc only; see the module docstring).

    Call once, first thing at daemon start. `heap_buffer_bytes`: a buffer allocated and freed
    in every matrix product (blas.per_product_scratch_bytes()), kept on the heap. A parameter
    the user set through glibc's own environment variables (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX) is left as they set it. Returns what was set, by
    parameter name; empty where the C library is not glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return {}
    env = os.environ if env is None else env
    threshold = mmap_threshold(heap_buffer_bytes)
    done: dict[str, int] = {}
    for name, param, value, variable in (
        ("mmap_threshold", M_MMAP_THRESHOLD, threshold, "MALLOC_MMAP_THRESHOLD_"),
        ("trim_threshold", M_TRIM_THRESHOLD, 2 * threshold, "MALLOC_TRIM_THRESHOLD_"),
        ("arena_max", M_ARENA_MAX, ARENA_MAX, "MALLOC_ARENA_MAX"),
    ):
        if variable in env:
            continue
        if mallopt(param, value) == 1:  # mallopt returns 1 on success
            done[name] = value
    return done


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


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).
    The worker calls it after every round of steps, so the holes that freed buffers below the
    mmap threshold leave never pile up past one round's."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_free_memory() -> None:
    """Return MLX's cached buffers and the heap's free pages to the OS (e.g. when idle)."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_cache()
    trim_heap()

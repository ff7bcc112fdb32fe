"""Memory housekeeping: MLX's buffer cache is capped on the CPU and emptied when idle; glibc
returns freed buffers to the OS (tune_malloc)."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from speclora.daemon import memory


@pytest.fixture(autouse=True)
def _restore_cache_limit():
    previous = mx.set_cache_limit(1 << 40)  # unbounded while the test churns
    yield
    mx.set_cache_limit(previous)
    mx.clear_cache()


def _churn() -> None:
    """Allocate and free a few large buffers so they land in MLX's cache."""
    for n in (1 << 20, 2 << 20, 3 << 20):
        mx.eval(mx.ones((n,), mx.float32) * 2)


def test_default_on_cpu_caps_the_cache_at_a_few_mib():
    if mx.metal.is_available():
        pytest.skip("on Metal the default keeps MLX's own limit")
    _churn()
    assert mx.get_cache_memory() > (memory.CPU_BUFFER_CACHE_MB << 20)  # unbounded keeps it all
    assert memory.limit_buffer_cache(None) == memory.CPU_BUFFER_CACHE_MB
    mx.clear_cache()
    _churn()
    assert mx.get_cache_memory() <= memory.CPU_BUFFER_CACHE_MB << 20


def test_configured_limit_wins():
    assert memory.limit_buffer_cache(0) == 0
    _churn()
    assert mx.get_cache_memory() == 0


def test_release_free_memory_empties_the_cache():
    _churn()
    assert mx.get_cache_memory() > 0
    memory.release_free_memory()
    assert mx.get_cache_memory() == 0


# What both malloc subprocesses below run first: libc's malloc and free, and their own RSS.
_LIBC = r"""
import ctypes, ctypes.util, json, sys
from speclora.daemon import memory

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
"""

# A subprocess that frees a mapped 8 MiB chunk (as loading weights does, which raises glibc's
# dynamic mmap threshold to 8 MiB), then allocates, touches and frees 64 chunks of 1 MiB under
# a live block (so the heap cannot shrink from its top), and prints the RSS they leave.
_HOLES = r"""
tuned = memory.tune_malloc({}) if sys.argv[1] == "tuned" else {}

big = libc.malloc(8 << 20)
ctypes.memset(big, 1, 8 << 20)
libc.free(big)
before = rss_mib()
chunks = [libc.malloc(1 << 20) for _ in range(64)]
for c in chunks:
    ctypes.memset(c, 1, 1 << 20)
pin = libc.malloc(300 << 10)  # too big for any free-list hole: from the heap's top
for c in chunks:
    libc.free(c)
print(json.dumps({"tuned": tuned, "left_mib": rss_mib() - before}))
"""


def _holes(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _LIBC + _HOLES, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(memory._mallopt() is None, reason="glibc's allocator only")
def test_tune_malloc_returns_freed_buffers_to_the_os():
    untuned = _holes("default")
    # The mechanism it fixes, on this libc: freed MiB-sized buffers stay resident.
    assert untuned["left_mib"] > 48, untuned
    tuned = _holes("tuned")
    assert tuned["tuned"] == {
        "mmap_threshold": memory.MMAP_THRESHOLD_BYTES,
        "trim_threshold": 2 * memory.MMAP_THRESHOLD_BYTES,
        "arena_max": memory.ARENA_MAX,
    }
    assert tuned["left_mib"] < 8, tuned


def test_tune_malloc_leaves_what_the_user_set_through_glibcs_variables(monkeypatch):
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(memory, "_mallopt", lambda: lambda p, v: calls.append((p, v)) or 1)
    env = {"MALLOC_ARENA_MAX": "8", "MALLOC_TRIM_THRESHOLD_": "0"}
    assert memory.tune_malloc(env) == {"mmap_threshold": memory.MMAP_THRESHOLD_BYTES}
    assert calls == [(memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD_BYTES)]
    calls.clear()
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    assert memory.tune_malloc(env) == {}
    assert calls == []


def test_the_threshold_sits_just_above_a_buffer_kept_on_the_heap():
    assert memory.mmap_threshold(0) == memory.MMAP_THRESHOLD_BYTES
    assert memory.mmap_threshold(64 << 10) == memory.MMAP_THRESHOLD_BYTES  # already on the heap
    assert memory.mmap_threshold(512 << 10) == (512 << 10) + memory.PAGE_BYTES
    assert memory.mmap_threshold(1 << 30) == memory.MMAP_THRESHOLD_MAX_BYTES  # glibc's ceiling


# A subprocess under the daemon's threshold for Debian's OpenBLAS (516 KiB) that allocates,
# touches and frees 64 chunks of 256 KiB under a live block, then trims the heap as the worker
# does after each round; it prints the RSS the chunks leave before and after the trim.
_TRIM = r"""
memory.tune_malloc({}, heap_buffer_bytes=512 << 10)

before = rss_mib()
chunks = [libc.malloc(256 << 10) for _ in range(64)]
for c in chunks:
    ctypes.memset(c, 1, 256 << 10)
pin = libc.malloc(300 << 10)
for c in chunks:
    libc.free(c)
held = rss_mib() - before
memory.trim_heap()
print(json.dumps({"held_mib": held, "left_mib": rss_mib() - before}))
"""


@pytest.mark.skipif(memory._mallopt() is None, reason="glibc's allocator only")
def test_trim_heap_returns_the_holes_of_buffers_below_the_threshold():
    out = subprocess.run(
        [sys.executable, "-c", _LIBC + _TRIM], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["held_mib"] > 12, result  # 16 MiB freed on the heap stay resident...
    assert result["left_mib"] < 4, result  # ...until the trim


# A subprocess that tunes malloc as the daemon does (or with the BLAS's per-product buffer left
# out), then counts the minor page faults of 200 threaded matrix products after a warm-up: a
# buffer mapped anew in each product faults its pages in every time.
_FAULTS = r"""
import json, resource, sys
from speclora.daemon import blas, memory

kept = blas.per_product_scratch_bytes() if sys.argv[1] == "tuned" else 0
memory.tune_malloc({}, heap_buffer_bytes=kept)
import mlx.core as mx

a, b = mx.random.normal((4, 576)), mx.random.normal((576, 1536))
for _ in range(20):
    mx.eval(a @ b)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    mx.eval(a @ b)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _openblas_threads() -> int:
    from speclora.daemon import blas

    if blas.blas_info().name != "openblas" or blas._handle is None:
        return 0
    return int(blas._handle.openblas_get_num_threads())


@pytest.mark.skipif(memory._mallopt() is None, reason="glibc's allocator only")
@pytest.mark.skipif(_openblas_threads() < 2, reason="OpenBLAS splitting products across threads")
def test_the_blas_per_product_buffer_is_not_mapped_anew_in_every_product():
    """OpenBLAS's threaded driver mallocs and frees its job table (512 KiB in Debian's build) in
    every product; under a 128 KiB threshold each one was a fresh mapping (and the daemon ~9%
    slower than the engine under glibc's defaults)."""

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)["faults"]

    assert faults("untuned") >= 200  # the mechanism, on this machine: at least one per product
    assert faults("tuned") < 50

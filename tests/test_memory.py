"""Memory housekeeping: MLX's buffer cache is capped on the CPU and emptied when idle."""

from __future__ import annotations

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

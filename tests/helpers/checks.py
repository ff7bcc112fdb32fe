"""What an in-process daemon holds right now: threads, memory, live generations and KV caches.
Load and fuzz tests compare these before and after a run to catch leaks."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

from speclora.daemon.stats import memory_usage

from helpers.daemons import LocalDaemon, wait_until


def live_kv_caches() -> int:
    """mlx-lm cache objects still reachable anywhere in this process, except those a prompt
    cache keeps on purpose (any daemon's, this test's or another's still alive)."""
    from mlx_lm.models.cache import _BaseCache
    from speclora.daemon.engine import PromptCache

    gc.collect()
    objects = gc.get_objects()
    kept = {id(c) for p in objects if isinstance(p, PromptCache) for c in p.held()}
    return sum(1 for obj in objects if isinstance(obj, _BaseCache) and id(obj) not in kept)


@dataclass(frozen=True)
class Usage:
    threads: int
    rss_bytes: int
    mlx_active_bytes: int  # MLX arrays alive: weights plus anything a request left behind
    kv_caches: int

    def growth_since(self, before: Usage) -> str:
        mib = 1 << 20
        return (
            f"threads {before.threads} -> {self.threads}, "
            f"RSS {before.rss_bytes / mib:.0f} -> {self.rss_bytes / mib:.0f} MiB, "
            f"MLX active {before.mlx_active_bytes / mib:.1f} -> "
            f"{self.mlx_active_bytes / mib:.1f} MiB, KV caches {before.kv_caches} -> "
            f"{self.kv_caches}"
        )


def usage(daemon: LocalDaemon) -> Usage:
    """After emptying the daemon's prompt cache, which keeps finished requests' KV caches on
    purpose (a bounded number, tested on its own), so MLX memory left over is a leak."""
    import mlx.core as mx

    def forget_prompts_then_measure(hub) -> int:
        if hub.prompt_cache is not None:
            hub.prompt_cache.clear()
        return mx.get_active_memory()

    # MLX is driven from the worker thread only, so the memory counter is read there too.
    active = daemon.worker.call("mlx_active_memory", forget_prompts_then_measure, 30)
    return Usage(threading.active_count(), memory_usage()[0], active, live_kv_caches())


def wait_idle(daemon: LocalDaemon, timeout: float = 10.0) -> None:
    """The worker has nothing running or queued, and every failure case is written."""
    worker = daemon.worker
    wait_until(
        lambda: worker.active_count == 0 and worker.queue_depth == 0,
        timeout,
        what="worker idle",
    )
    if worker.recorder is not None:
        assert worker.recorder.flush(timeout), "the failure recorder did not drain"

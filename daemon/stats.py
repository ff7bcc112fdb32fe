"""Serving statistics: lifetime and recent-window acceptance, per adapter, and memory.

The worker records one entry per finished generation; Stats RPC handler threads read
snapshots. Neither side touches MLX, so snapshots never wait behind engine steps.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from speclora.daemon.engine.events import GenerationSummary, Mode


@dataclass(frozen=True)
class AdapterAcceptance:
    adapter_version: str  # "" = base draft
    requests: int
    proposed: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass(frozen=True)
class ServingStats:
    """What the tracker counted; the servicer adds models, queue and learning state."""

    uptime_s: float
    requests_total: int
    requests_cancelled: int
    tokens_total: int
    prompt_tokens_total: int
    prompt_tokens_cached: int  # of those, taken from the prompt cache
    acceptance_lifetime: float
    acceptance_recent: float
    acceptance_history: tuple[float, ...]  # per request, oldest first
    per_adapter: tuple[AdapterAcceptance, ...]
    tokens_per_second_recent: float


@dataclass(frozen=True)
class StatsSnapshot:
    """The daemon's state as the Stats RPC reports it (fields mirror StatsSnapshot in the proto)."""

    target_model: str
    draft_model: str
    adapter_version: str
    uptime_s: float
    requests_total: int
    requests_active: int
    tokens_total: int
    prompt_tokens_total: int
    prompt_tokens_cached: int
    acceptance_lifetime: float
    acceptance_recent: float
    acceptance_history: tuple[float, ...]
    per_adapter: tuple[AdapterAcceptance, ...]
    tokens_per_second_recent: float
    failure_cases: int
    pending_cases: int
    training_state: str  # "idle" | "running" | "failed"
    queue_depth: int
    rss_bytes: int
    peak_rss_bytes: int
    weight_bytes: int
    prompt_cache_bytes: int
    blas: str
    version: str
    default_mode: Mode
    # The history drafter's past requests in memory (committed ones only); 0 when it is off.
    history_documents: int = 0
    history_tokens: int = 0
    history_bytes: int = 0


@dataclass(frozen=True)
class _Recent:
    proposed: int
    accepted: int
    tokens_per_second: float
    spoke: bool  # whether the draft proposed anything (K > 0 at some step)


class StatsTracker:
    """Thread-safe counters fed by the worker thread, read by RPC threads."""

    def __init__(self, window: int = 64) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._requests = 0
        self._cancelled = 0
        self._tokens = 0
        self._prompt_tokens = 0
        self._prompt_cached = 0
        self._proposed = 0
        self._accepted = 0
        self._recent: deque[_Recent] = deque(maxlen=window)
        self._adapters: dict[str, AdapterAcceptance] = {}

    def record(self, summary: GenerationSummary, adapter_version: str) -> None:
        with self._lock:
            self._requests += 1
            self._tokens += summary.completion_tokens
            self._prompt_tokens += summary.prompt_tokens
            self._prompt_cached += summary.cached_prompt_tokens
            self._proposed += summary.proposed
            self._accepted += summary.accepted
            self._recent.append(
                _Recent(
                    summary.proposed,
                    summary.accepted,
                    summary.tokens_per_second,
                    summary.proposed > 0,
                )
            )
            old = self._adapters.get(adapter_version, AdapterAcceptance(adapter_version, 0, 0, 0))
            self._adapters[adapter_version] = AdapterAcceptance(
                adapter_version,
                old.requests + 1,
                old.proposed + summary.proposed,
                old.accepted + summary.accepted,
            )

    def record_cancelled(self, tokens: int) -> None:
        with self._lock:
            self._cancelled += 1
            self._tokens += tokens

    def snapshot(self) -> ServingStats:
        with self._lock:
            recent = list(self._recent)
            proposed = sum(r.proposed for r in recent)
            accepted = sum(r.accepted for r in recent)
            rates = [r.tokens_per_second for r in recent if r.tokens_per_second > 0]
            return ServingStats(
                uptime_s=time.monotonic() - self._started,
                requests_total=self._requests,
                requests_cancelled=self._cancelled,
                tokens_total=self._tokens,
                prompt_tokens_total=self._prompt_tokens,
                prompt_tokens_cached=self._prompt_cached,
                acceptance_lifetime=self._accepted / self._proposed if self._proposed else 0.0,
                acceptance_recent=accepted / proposed if proposed else 0.0,
                # Requests where the draft never spoke have no acceptance; leave them out.
                acceptance_history=tuple(r.accepted / r.proposed for r in recent if r.spoke),
                per_adapter=tuple(self._adapters[k] for k in sorted(self._adapters)),
                tokens_per_second_recent=sum(rates) / len(rates) if rates else 0.0,
            )


def memory_usage() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process; 0 where unknown."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is bytes on macOS and kilobytes on Linux.
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    current = _current_rss()
    return current, max(peak_bytes, current)


def _current_rss() -> int:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0
    if sys.platform == "darwin":
        return _darwin_rss()
    return 0


def _darwin_rss() -> int:
    # proc_pidinfo(PROC_PIDTASKINFO) fills struct proc_taskinfo (96 bytes); its second
    # uint64 is pti_resident_size. No third-party package needed.
    import ctypes

    try:
        libproc = ctypes.CDLL("/usr/lib/libproc.dylib")
        info = (ctypes.c_uint64 * 12)()
        size = libproc.proc_pidinfo(os.getpid(), 4, ctypes.c_uint64(0), info, ctypes.sizeof(info))
        return int(info[1]) if size == ctypes.sizeof(info) else 0
    except (OSError, AttributeError):
        return 0

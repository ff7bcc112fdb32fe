"""Serving statistics: lifetime and recent-window acceptance, per adapter, and memory.

The worker records one entry per finished generation; Stats RPC handler threads read
snapshots. Neither side touches MLX, so snapshots never wait behind engine steps.
"""

from __future__ import annotations

import bisect
import os
import resource
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from speclora.daemon import blas
from speclora.daemon.engine.events import GenerationSummary, Mode
from speclora.daemon.errors import StoreUnavailableError
from speclora.daemon.learning.events import TrainResult
from speclora.daemon.timeline import Timeline

import speclora

if TYPE_CHECKING:
    from speclora.daemon.worker import Worker

TRAINING_TASK = "training"  # the worker task a training run is

# Histogram buckets (seconds), vLLM's for the same two measures.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


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
class HistogramSnapshot:
    """Observations per bucket: counts[i] fell at or below bounds[i] and above bounds[i - 1];
    the last count is above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)


# Who proposes: the model draft, the history drafter, a request's grammar (its forced runs).
SOURCES = ("draft", "history", "grammar")


@dataclass(frozen=True)
class DraftSteps:
    """What one generation's speculative steps did (detailed mode, where each step is traced),
    per source of proposals."""

    drafts: tuple[tuple[str, int], ...] = ()  # (source, steps where it proposed)
    # (source, [i]: its steps whose proposal i was accepted)
    accepted_per_position: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Counters:
    """Lifetime counters /metrics reports beside the Stats fields (vLLM's spec_decode schema)."""

    finish_reasons: tuple[tuple[str, int], ...] = ()  # (reason, requests); client cancels too
    # Per source ("draft", "history"), finished requests: tokens proposed, of those accepted,
    # speculative steps (detailed mode only: fast mode traces no steps), and per position.
    proposed: tuple[tuple[str, int], ...] = ()
    accepted: tuple[tuple[str, int], ...] = ()
    drafts: tuple[tuple[str, int], ...] = ()
    accepted_per_position: tuple[tuple[str, tuple[int, ...]], ...] = ()
    time_to_first_token: HistogramSnapshot = field(
        default_factory=lambda: _Histogram(TTFT_BUCKETS).snapshot()
    )
    request_duration: HistogramSnapshot = field(
        default_factory=lambda: _Histogram(LATENCY_BUCKETS).snapshot()
    )
    task_runs: tuple[tuple[str, str, int], ...] = ()  # (task, outcome, runs)
    auto_train_runs: int = 0
    # The worker's model forwards for generations' passes, target and draft (engine/batch.py),
    # the passes they carried (more than one: a shared forward) and the tokens they ran over.
    model_forwards: int = 0
    model_forward_rows: int = 0
    model_forward_tokens: int = 0


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
    counters: Counters = field(default_factory=Counters)
    sources: SourceCounts = field(default_factory=lambda: SourceCounts())
    last_training: LastTraining | None = None
    training_slice_max_s: float = 0.0


@dataclass(frozen=True)
class SourceCounts:
    """Proposals by source since start, and each source's acceptance over the recent window."""

    draft_proposed: int = 0
    draft_accepted: int = 0
    history_proposed: int = 0
    history_accepted: int = 0
    draft_acceptance_recent: float = 0.0
    history_acceptance_recent: float = 0.0


@dataclass(frozen=True)
class HistoryCounts:
    """What the history drafter holds (engine.history.SuffixIndex)."""

    tokens: int = 0
    documents: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class LastTraining:
    """How the last training run since start ended (a TrainResult, stamped when it ended)."""

    adapter_version: str
    promoted: bool
    reason: str
    acceptance_before: float
    acceptance_after: float
    duration_s: float
    finished_at: float  # Unix time
    trigger: str  # "auto" | "manual"


@dataclass(frozen=True)
class AutoTrain:
    """Whether and why the daemon is about to train by itself (learning.auto_train)."""

    enabled: bool = False
    state: str = (
        "off"  # off|no_draft|store_unavailable|waiting_for_cases|waiting_for_idle|due|running
    )
    idle_s: float = 0.0  # the configured idle time it needs
    min_new_cases: int = 0
    runs: int = 0  # runs it started since the daemon started


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
    blas_skinny_rows: int = 0
    counters: Counters = field(default_factory=Counters)  # not in the proto (yet); /metrics
    sources: SourceCounts = field(default_factory=lambda: SourceCounts())
    history: HistoryCounts = field(default_factory=lambda: HistoryCounts())
    failure_store_error: str = ""  # why the failure counts are 0 ("" = the store is fine)
    auto_train: AutoTrain = field(default_factory=AutoTrain)
    last_training: LastTraining | None = None
    training_slice_max_s: float = 0.0  # longest slice of the running or last training run
    idle_s: float = 0.0  # how long the worker has had nothing to do


@dataclass(frozen=True)
class _Recent:
    proposed: int
    accepted: int
    tokens_per_second: float
    spoke: bool  # whether anything was proposed (K > 0 at some step)
    draft_proposed: int = 0
    draft_accepted: int = 0
    history_proposed: int = 0
    history_accepted: int = 0


def _rate(accepted: int, proposed: int) -> float:
    return accepted / proposed if proposed else 0.0


class StatsTracker:
    """Thread-safe counters fed by the worker thread, read by RPC threads."""

    def __init__(self, window: int = 64, timeline_requests: int = 5000) -> None:
        self._lock = threading.Lock()
        # Every request and training run, bounded, for the page's chart (GET /api/timeline).
        self.timeline = Timeline(timeline_requests)
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
        self._finish: Counter[str] = Counter()
        self._by_source = {name: [0, 0] for name in SOURCES}  # [proposed, accepted]
        self._drafts: Counter[str] = Counter()
        self._per_position: dict[str, list[int]] = {name: [] for name in SOURCES}
        self._ttft = _Histogram(TTFT_BUCKETS)
        self._duration = _Histogram(LATENCY_BUCKETS)
        self._tasks: Counter[tuple[str, str]] = Counter()
        self._slice_max: dict[str, float] = {}  # per task: longest slice of its current run
        self._last_training: LastTraining | None = None
        self._auto_runs = 0
        self._forwards = [0, 0, 0]  # forwards, rows, tokens

    def record(
        self, summary: GenerationSummary, adapter_version: str, steps: DraftSteps = DraftSteps()
    ) -> None:
        with self._lock:
            self._finish[summary.finish_reason] += 1
            for source, n in steps.drafts:
                self._drafts[source] += n
            for source, counts in steps.accepted_per_position:
                mine = self._per_position[source]
                for i, n in enumerate(counts):
                    if i == len(mine):
                        mine.append(0)
                    mine[i] += n
            if summary.completion_tokens:
                self._ttft.observe(summary.time_to_first_token_s)
            self._duration.observe(summary.total_time_s)
            self._requests += 1
            self._tokens += summary.completion_tokens
            self._prompt_tokens += summary.prompt_tokens
            self._prompt_cached += summary.cached_prompt_tokens
            self._proposed += summary.proposed
            self._accepted += summary.accepted
            for source, proposed, accepted in (
                ("draft", summary.draft_proposed, summary.draft_accepted),
                ("history", summary.history_proposed, summary.history_accepted),
                ("grammar", summary.grammar_proposed, summary.grammar_accepted),
            ):
                self._by_source[source][0] += proposed
                self._by_source[source][1] += accepted
            self._recent.append(
                _Recent(
                    summary.proposed,
                    summary.accepted,
                    summary.tokens_per_second,
                    summary.proposed > 0,
                    summary.draft_proposed,
                    summary.draft_accepted,
                    summary.history_proposed,
                    summary.history_accepted,
                )
            )
            # Per adapter: the model draft's own proposals, which the adapter changes.
            old = self._adapters.get(adapter_version, AdapterAcceptance(adapter_version, 0, 0, 0))
            self._adapters[adapter_version] = AdapterAcceptance(
                adapter_version,
                old.requests + 1,
                old.proposed + summary.draft_proposed,
                old.accepted + summary.draft_accepted,
            )
        self.timeline.add_request(summary, adapter_version)

    def record_cancelled(self, tokens: int) -> None:
        with self._lock:
            self._cancelled += 1
            self._finish["cancelled"] += 1
            self._tokens += tokens

    def record_task(self, name: str, outcome: str, last_event: object = None) -> None:
        """A background task (training) ended: 'promoted', 'rejected', 'failed', 'cancelled'...
        A training run's last event, its TrainResult, becomes Stats' `last_training`."""
        with self._lock:
            self._tasks[(name, outcome)] += 1
            if name == TRAINING_TASK and isinstance(last_event, TrainResult):
                self._last_training = LastTraining(
                    adapter_version=last_event.adapter_version,
                    promoted=last_event.promoted,
                    reason=last_event.reason,
                    acceptance_before=last_event.acceptance_before,
                    acceptance_after=last_event.acceptance_after,
                    duration_s=last_event.duration_s,
                    finished_at=time.time(),
                    trigger=last_event.trigger,
                )
        if name == TRAINING_TASK:
            self.timeline.training_ended(outcome)

    def record_task_event(self, name: str, event: object) -> None:
        """An event of a running background task (a training run's progress, evaluations and
        result), for the timeline."""
        if name == TRAINING_TASK:
            self.timeline.training_event(event)

    def task_started(self, name: str) -> None:
        """A background task is starting: the longest slice of its run starts again at 0."""
        with self._lock:
            self._slice_max[name] = 0.0

    def record_batch(self, forwards: int, rows: int, tokens: int) -> None:
        """The worker ran `forwards` model forwards for `rows` generations' passes over
        `tokens` (one per model when batched, one per pass when not)."""
        with self._lock:
            self._forwards[0] += forwards
            self._forwards[1] += rows
            self._forwards[2] += tokens

    def record_auto_start(self, name: str) -> None:
        """The daemon started a training run by itself (and the run accepted its cases)."""
        if name == TRAINING_TASK:
            with self._lock:
                self._auto_runs += 1

    def record_slice(self, name: str, seconds: float) -> None:
        """One slice (one `next()`) of a background task took `seconds`."""
        with self._lock:
            self._slice_max[name] = max(self._slice_max.get(name, 0.0), seconds)

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
                counters=Counters(
                    finish_reasons=tuple(sorted(self._finish.items())),
                    proposed=tuple((name, self._by_source[name][0]) for name in SOURCES),
                    accepted=tuple((name, self._by_source[name][1]) for name in SOURCES),
                    drafts=tuple((name, self._drafts[name]) for name in SOURCES),
                    accepted_per_position=tuple(
                        (name, tuple(self._per_position[name])) for name in SOURCES
                    ),
                    time_to_first_token=self._ttft.snapshot(),
                    request_duration=self._duration.snapshot(),
                    task_runs=tuple((t, o, n) for (t, o), n in sorted(self._tasks.items())),
                    auto_train_runs=self._auto_runs,
                    model_forwards=self._forwards[0],
                    model_forward_rows=self._forwards[1],
                    model_forward_tokens=self._forwards[2],
                ),
                last_training=self._last_training,
                training_slice_max_s=self._slice_max.get(TRAINING_TASK, 0.0),
                sources=SourceCounts(
                    draft_proposed=self._by_source["draft"][0],
                    draft_accepted=self._by_source["draft"][1],
                    history_proposed=self._by_source["history"][0],
                    history_accepted=self._by_source["history"][1],
                    draft_acceptance_recent=_rate(
                        sum(r.draft_accepted for r in recent), sum(r.draft_proposed for r in recent)
                    ),
                    history_acceptance_recent=_rate(
                        sum(r.history_accepted for r in recent),
                        sum(r.history_proposed for r in recent),
                    ),
                ),
            )


def daemon_snapshot(
    worker: Worker,
    default_mode: Mode,
    failure_counts: Callable[[], tuple[int, int]] | None = None,
) -> StatsSnapshot:
    """The daemon's state as every transport reports it, without waiting for the worker.

    `failure_counts` -> (failure cases stored, cases since the last run), None without a
    learning loop."""
    hub = worker.hub
    serving = worker.stats.snapshot()
    failures, pending, store_error = 0, 0, ""
    if failure_counts is not None:
        try:
            failures, pending = failure_counts()
        except StoreUnavailableError as exc:  # still a snapshot: serving goes on
            store_error = str(exc)
    rss, peak = memory_usage()
    training_state = worker.task_state(TRAINING_TASK)
    idle = worker.idle_seconds
    return StatsSnapshot(
        target_model=hub.target_name,
        draft_model=hub.draft_name,
        adapter_version=hub.adapter_version,
        uptime_s=serving.uptime_s,
        requests_total=serving.requests_total,
        requests_active=worker.active_count,
        tokens_total=serving.tokens_total,
        prompt_tokens_total=serving.prompt_tokens_total,
        prompt_tokens_cached=serving.prompt_tokens_cached,
        acceptance_lifetime=serving.acceptance_lifetime,
        acceptance_recent=serving.acceptance_recent,
        acceptance_history=serving.acceptance_history,
        per_adapter=serving.per_adapter,
        tokens_per_second_recent=serving.tokens_per_second_recent,
        failure_cases=failures,
        pending_cases=pending,
        training_state=training_state,
        queue_depth=worker.queue_depth,
        rss_bytes=rss,
        peak_rss_bytes=peak,
        weight_bytes=hub.resident_weight_bytes(),
        prompt_cache_bytes=hub.prompt_cache.stats().bytes if hub.prompt_cache else 0,
        blas=blas.blas_info().name,
        blas_skinny_rows=blas.blas_info().skinny_rows,
        version=speclora.__version__,
        default_mode=default_mode,
        counters=serving.counters,
        sources=serving.sources,
        history=history_counts(hub),
        failure_store_error=store_error,
        auto_train=auto_train_state(
            worker,
            learning=failure_counts is not None,
            pending=pending,
            total=failures,
            store_error=store_error,
            training=training_state == "running",
            idle_s=idle,
            runs=serving.counters.auto_train_runs,
        ),
        last_training=serving.last_training,
        training_slice_max_s=serving.training_slice_max_s,
        idle_s=idle,
    )


def auto_train_state(
    worker: Worker,
    *,
    learning: bool,
    pending: int,
    total: int,
    store_error: str,
    training: bool,
    idle_s: float,
    runs: int,
) -> AutoTrain:
    """What the auto-trainer (runtime.AutoTrainer) waits for, by the rule it applies."""
    cfg = worker.config.learning
    enabled = cfg.auto_train and learning
    if not enabled:
        state = "off"
    elif training:
        state = "running"
    elif worker.hub.draft is None:
        state = "no_draft"
    elif store_error:
        state = "store_unavailable"
    elif pending < cfg.auto_train_min_new_cases or total < cfg.min_cases:
        state = "waiting_for_cases"
    elif idle_s < cfg.auto_train_idle_s:
        state = "waiting_for_idle"
    else:
        state = "due"
    return AutoTrain(enabled, state, cfg.auto_train_idle_s, cfg.auto_train_min_new_cases, runs)


def history_counts(hub: object) -> HistoryCounts:
    """What the hub's history drafter holds (all zero without one)."""
    history = getattr(hub, "history", None)
    index = getattr(history, "index", None)
    if index is None:
        return HistoryCounts()
    return HistoryCounts(tokens=index.tokens, documents=index.documents, bytes=index.nbytes)


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

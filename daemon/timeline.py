"""The daemon's recent past, one point per request and one record per training run, for the web
page's learning chart and for tools (GET /api/timeline).

Stats keeps counters and a short window; this keeps every finished request's summary (bounded
by server.timeline_requests, oldest dropped first) and the last training runs, so a chart can
show acceptance rising across adapter versions. Fed by the worker thread through StatsTracker,
read by HTTP handlers; a lock guards both. No MLX, no I/O; it lives as long as the process.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Any

from speclora.daemon.engine.events import GenerationSummary

MAX_TRAINING_RUNS = 100  # runs kept; each is small (its loss curve is capped below)
MAX_LOSS_POINTS = 256  # a longer run keeps every n-th step's loss, its last one always


@dataclass(frozen=True, slots=True)
class RequestPoint:
    """One finished generation, as the learning chart plots it."""

    seq: int  # 1, 2, ... since the daemon started (a client asks for points after one it has)
    time: float  # Unix seconds when it finished
    adapter_version: str  # "" = the base draft
    mode: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    proposed: int
    accepted: int
    draft_proposed: int
    draft_accepted: int
    history_proposed: int
    history_accepted: int
    from_draft: int  # completion tokens the model draft proposed and the target accepted
    from_history: int  # ... the history drafter proposed
    target_passes: int
    tokens_per_second: float
    time_to_first_token_s: float

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.completion_tokens / self.target_passes if self.target_passes else 0.0

    def to_json(self) -> dict[str, Any]:
        out = _fields(self)
        out["acceptance"] = self.acceptance
        out["draft_acceptance"] = _rate(self.draft_accepted, self.draft_proposed)
        out["history_acceptance"] = _rate(self.history_accepted, self.history_proposed)
        out["tokens_per_pass"] = self.tokens_per_pass
        return out


@dataclass(frozen=True, slots=True)
class TrainingRun:
    """One training run as far as it got: started, its losses, the held-out evaluations, and how
    it ended (`outcome`: running, promoted, rejected, failed, cancelled)."""

    seq: int
    started_at: float  # Unix seconds
    finished_at: float | None = None
    outcome: str = "running"
    parent_version: str = ""
    train_cases: int = 0
    heldout_cases: int = 0
    steps_planned: int = 0
    steps_done: int = 0
    losses: tuple[tuple[int, float], ...] = ()  # (step, loss), at most MAX_LOSS_POINTS
    heldout_before: float | None = None
    heldout_after: float | None = None
    adapter_version: str = ""  # the version it wrote ("" until its result)
    promoted: bool = False
    reason: str = ""
    duration_s: float | None = None
    requests_before: int = 0  # requests the timeline had seen when it started

    def to_json(self) -> dict[str, Any]:
        out = _fields(self)
        out["losses"] = [[s, _finite(v)] for s, v in self.losses]
        return out


def _fields(obj: RequestPoint | TrainingRun) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _rate(accepted: int, proposed: int) -> float:
    return accepted / proposed if proposed else 0.0


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def _thin(losses: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    """Halve a full loss curve (every other point, the last kept) so it stays bounded."""
    return (*losses[:-1:2], losses[-1])


class Timeline:
    """Bounded per-request points and training runs (thread-safe)."""

    def __init__(self, max_requests: int = 5000) -> None:
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self._requests: deque[RequestPoint] = deque(maxlen=max_requests)
        self._runs: deque[TrainingRun] = deque(maxlen=MAX_TRAINING_RUNS)
        self._seq = 0
        self._run_seq = 0

    def add_request(self, summary: GenerationSummary, adapter_version: str) -> None:
        s = summary
        with self._lock:
            self._seq += 1
            self._requests.append(
                RequestPoint(
                    seq=self._seq,
                    time=time.time(),
                    adapter_version=adapter_version,
                    mode=s.mode,
                    finish_reason=s.finish_reason,
                    prompt_tokens=s.prompt_tokens,
                    completion_tokens=s.completion_tokens,
                    proposed=s.proposed,
                    accepted=s.accepted,
                    draft_proposed=s.draft_proposed,
                    draft_accepted=s.draft_accepted,
                    history_proposed=s.history_proposed,
                    history_accepted=s.history_accepted,
                    from_draft=sum(s.from_draft),
                    from_history=sum(s.from_history),
                    target_passes=s.target_passes,
                    tokens_per_second=s.tokens_per_second,
                    time_to_first_token_s=s.time_to_first_token_s,
                )
            )

    # A training run's events arrive by class name, so this module needs nothing of the
    # learning package (daemon.learning.events defines them).

    def training_event(self, event: object) -> None:
        """One event of the running training task (TrainStarted, TrainProgress, ...)."""
        kind = type(event).__name__
        if kind == "TrainTick":
            return
        with self._lock:
            if kind == "TrainStarted" or not self._runs or self._runs[-1].outcome != "running":
                self._run_seq += 1
                self._runs.append(
                    TrainingRun(self._run_seq, time.time(), requests_before=self._seq)
                )
            run = self._runs[-1]
            get = getattr(event, "__dict__", {}).get
            if kind == "TrainStarted":
                run = replace(
                    run,
                    parent_version=get("parent_version", ""),
                    train_cases=get("train_cases", 0),
                    heldout_cases=get("heldout_cases", 0),
                    steps_planned=get("steps", 0),
                )
            elif kind == "TrainProgress":
                losses = (*run.losses, (int(get("step", 0)), float(get("loss", math.nan))))
                if len(losses) > MAX_LOSS_POINTS:
                    losses = _thin(losses)
                run = replace(run, steps_done=int(get("step", 0)), losses=losses)
            elif kind == "TrainEvaluation":
                phase = "heldout_before" if get("phase") == "before" else "heldout_after"
                run = replace(run, **{phase: float(get("heldout_acceptance", 0.0))})
            elif kind == "TrainResult":
                run = replace(
                    run,
                    adapter_version=get("adapter_version", ""),
                    promoted=bool(get("promoted", False)),
                    reason=get("reason", ""),
                    heldout_before=get("acceptance_before", run.heldout_before),
                    heldout_after=get("acceptance_after", run.heldout_after),
                    duration_s=get("duration_s"),
                )
            self._runs[-1] = run

    def training_ended(self, outcome: str) -> None:
        """The training task ended: promoted, rejected, failed or cancelled."""
        with self._lock:
            if not self._runs or self._runs[-1].outcome != "running":
                return  # it failed before it started (no cases): nothing was drawn
            run = self._runs[-1]
            now = time.time()
            self._runs[-1] = replace(
                run,
                outcome=outcome,
                finished_at=now,
                duration_s=run.duration_s if run.duration_s is not None else now - run.started_at,
            )

    def snapshot(self, since: int = 0) -> tuple[list[RequestPoint], list[TrainingRun], int]:
        """(points with seq > since, every kept run, the latest seq)."""
        with self._lock:
            points = [p for p in self._requests if p.seq > since] if since else list(self._requests)
            return points, list(self._runs), self._seq

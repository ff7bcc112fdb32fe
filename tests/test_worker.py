"""The engine worker with a scripted engine: interleaving, limits, cancellation, errors, tasks.

No MLX here: the fake engine yields the same event types the real one does, so these tests pin
down the scheduling behaviour in milliseconds.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
from speclora.daemon.engine.events import (
    GenerationRequest,
    GenerationSummary,
    PrefillProgress,
    StepEvent,
    TextChunk,
)
from speclora.daemon.errors import (
    InvalidRequestError,
    PreconditionError,
    QueueFullError,
    ShuttingDownError,
)
from speclora.daemon.state import ModelHub
from speclora.daemon.worker import GenerationResult, Worker
from speclora.shared.config import Config, ServerConfig


def _config(**server: object) -> Config:
    return dataclasses.replace(Config(), server=dataclasses.replace(ServerConfig(), **server))


def _hub() -> ModelHub:
    return ModelHub(target=None, draft=None, tokenizer=None, target_name="t", draft_name="d")


def _summary(n: int, reason: str = "length") -> GenerationSummary:
    return GenerationSummary(
        prompt_tokens=3,
        completion_tokens=n,
        proposed=2 * n,
        accepted=n,
        draft_proposed=2 * n,
        draft_accepted=n,
        target_passes=n,
        time_to_first_token_s=0.0,
        tokens_per_second=100.0,
        total_time_s=0.01,
        finish_reason=reason,  # type: ignore[arg-type]
        mode="detailed",
        completion_token_ids=tuple(range(n)),
    )


class ScriptedEngine:
    """Each request emits prompt-tagged tokens; records the global order of steps."""

    def __init__(self, step_delay: float = 0.0) -> None:
        self.order: list[str] = []
        self.closed: list[str] = []
        self.step_delay = step_delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(
        self, hub: ModelHub, request: GenerationRequest, prompt_tokens: list[int] | None
    ) -> Iterator[object]:
        name = request.prompt
        try:
            yield PrefillProgress(1, 1)
            for i in range(request.max_tokens):
                self.gate.wait()
                if self.step_delay:
                    time.sleep(self.step_delay)
                if name == "boom" and i == 1:
                    raise RuntimeError("engine bug")
                if name == "bad":
                    raise InvalidRequestError("prompt", "too odd")
                self.order.append(name)
                yield StepEvent(TextChunk(f"{name}{i} ", (i,), (False,)))
            yield _summary(request.max_tokens)
        finally:
            self.closed.append(name)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


def _worker(engine: ScriptedEngine, **server: object) -> Worker:
    return Worker(_hub(), _config(**server), generate_fn=engine).start()


def _request(prompt: str, n: int = 3) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=n, request_id=prompt)


def test_stream_ends_with_result_and_stats(engine: ScriptedEngine) -> None:
    worker = _worker(engine)
    events = list(worker.submit_generation(_request("a", 3)))
    assert [e.text for e in events[:-1]] == ["a0 ", "a1 ", "a2 "]
    result = events[-1]
    assert isinstance(result, GenerationResult)
    assert result.request_id == "a" and result.summary.completion_tokens == 3
    snap = worker.stats.snapshot()
    assert snap.requests_total == 1 and snap.tokens_total == 3
    assert snap.acceptance_lifetime == pytest.approx(0.5)
    assert [a.adapter_version for a in snap.per_adapter] == [""]
    worker.stop()


def test_the_heap_is_trimmed_after_every_round_of_steps(
    engine: ScriptedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buffers below the mmap threshold leave heap holes; each round's go back (memory.py)."""
    from speclora.daemon import worker as worker_module

    rounds: list[int] = []
    monkeypatch.setattr(worker_module, "trim_heap", lambda: rounds.append(len(engine.order)))
    worker = _worker(engine)
    list(worker.submit_generation(_request("a", 3)))
    worker.stop()
    # One trim per round: the prefill's, each of the three tokens', the summary's.
    assert rounds == [0, 1, 2, 3, 3]


def test_active_generations_interleave_round_robin(engine: ScriptedEngine) -> None:
    engine.gate.clear()  # hold the worker until both are queued
    worker = _worker(engine, max_active=4)
    jobs = [worker.submit_generation(_request(name, 4)) for name in ("a", "b")]
    engine.gate.set()
    for job in jobs:
        list(job)
    # Each round advances every active request once: a and b alternate.
    assert engine.order[:6] == ["a", "b", "a", "b", "a", "b"]
    worker.stop()


def test_max_active_bounds_the_interleaving(engine: ScriptedEngine) -> None:
    engine.gate.clear()
    worker = _worker(engine, max_active=1)
    jobs = [worker.submit_generation(_request(name, 3)) for name in ("a", "b")]
    engine.gate.set()
    for job in jobs:
        list(job)
    assert engine.order == ["a"] * 3 + ["b"] * 3
    worker.stop()


def test_full_queue_is_refused_at_once_naming_its_size(engine: ScriptedEngine) -> None:
    engine.gate.clear()
    worker = _worker(engine, max_active=1, queue_size=2)
    first = worker.submit_generation(_request("a", 2))
    time.sleep(0.05)  # admitted and blocked in its first step
    waiting = [worker.submit_generation(_request(f"w{i}", 1)) for i in range(2)]
    started = time.monotonic()
    with pytest.raises(QueueFullError, match="full \\(2 requests waiting"):
        worker.submit_generation(_request("x", 1))
    assert time.monotonic() - started < 0.1
    assert worker.queue_depth == 2
    engine.gate.set()
    for job in [first, *waiting]:
        assert isinstance(list(job)[-1], GenerationResult)
    worker.stop()


def test_cancel_frees_the_slot_before_the_next_step(engine: ScriptedEngine) -> None:
    engine.step_delay = 0.002
    worker = _worker(engine, max_active=1)
    long = worker.submit_generation(_request("long", 10_000))
    it = iter(long)
    next(it)
    long.cancel()
    assert list(it) == []  # the reader is released at once
    started = time.monotonic()
    events = list(worker.submit_generation(_request("short", 2)))
    assert isinstance(events[-1], GenerationResult)
    assert time.monotonic() - started < 1.0
    assert "long" in engine.closed  # its generator (and caches) were released
    assert engine.order.count("long") < 100
    assert worker.stats.snapshot().requests_cancelled == 1
    worker.stop()


def test_cancel_while_queued_never_runs(engine: ScriptedEngine) -> None:
    engine.gate.clear()
    worker = _worker(engine, max_active=1)
    first = worker.submit_generation(_request("a", 1))
    time.sleep(0.05)
    queued = worker.submit_generation(_request("q", 1))
    queued.cancel()
    assert worker.queue_depth == 0
    engine.gate.set()
    list(first)
    worker.stop()
    assert "q" not in engine.order


def test_errors_travel_through_the_job_queue(engine: ScriptedEngine) -> None:
    worker = _worker(engine)
    with pytest.raises(InvalidRequestError, match="prompt: too odd"):
        list(worker.submit_generation(_request("bad", 3)))
    with pytest.raises(RuntimeError, match="engine bug"):
        list(worker.submit_generation(_request("boom", 3)))
    # The worker survives both and keeps serving.
    assert isinstance(list(worker.submit_generation(_request("ok", 1)))[-1], GenerationResult)
    assert worker.alive
    worker.stop()


def test_tasks_yield_to_generations_and_are_exclusive(engine: ScriptedEngine) -> None:
    worker = _worker(engine)
    steps: list[str] = []
    release = threading.Event()

    def training(hub: ModelHub) -> Iterator[int]:
        for i in range(3):
            steps.append(f"train{i}")
            yield i
            release.wait()

    job = worker.submit_task("training", training)
    with pytest.raises(PreconditionError, match="already running"):
        worker.submit_task("training", training)
    it = iter(job)
    assert next(it) == 0
    assert worker.task_state("training") == "running"
    release.set()
    assert list(it) == [1, 2]
    assert worker.task_state("training") == "idle"
    worker.submit_task("training", training)  # allowed again once finished
    worker.stop()


def test_generation_priority_over_task(engine: ScriptedEngine) -> None:
    engine.gate.clear()
    worker = _worker(engine)
    gen = worker.submit_generation(_request("g", 3))
    time.sleep(0.05)
    log: list[str] = engine.order

    def training(hub: ModelHub) -> Iterator[int]:
        for i in range(2):
            log.append("T")
            yield i

    task = worker.submit_task("training", training)
    engine.gate.set()
    list(gen)
    list(task)
    assert log == ["g", "g", "g", "T", "T"]
    worker.stop()


def test_failed_task_reports_failed_state(engine: ScriptedEngine) -> None:
    worker = _worker(engine)

    def training(hub: ModelHub) -> Iterator[int]:
        yield 1
        raise ValueError("diverged")

    with pytest.raises(ValueError, match="diverged"):
        list(worker.submit_task("training", training))
    assert worker.task_state("training") == "failed"
    worker.stop()


def test_call_runs_in_the_worker_thread(engine: ScriptedEngine) -> None:
    worker = _worker(engine)
    names = worker.call("probe", lambda hub: (threading.current_thread().name, hub.target_name))
    assert names == ("engine-worker", "t")
    with pytest.raises(KeyError):
        worker.call("bad", lambda hub: {}["x"])
    worker.stop()


def test_drain_lets_running_streams_finish_then_refuses(engine: ScriptedEngine) -> None:
    engine.step_delay = 0.01
    worker = _worker(engine)
    job = worker.submit_generation(_request("a", 5))
    assert worker.drain(timeout=5.0)
    assert isinstance(list(job)[-1], GenerationResult)
    with pytest.raises(ShuttingDownError):
        worker.submit_generation(_request("late", 1))
    worker.stop()


def test_stop_after_grace_ends_streams_cleanly(engine: ScriptedEngine) -> None:
    engine.step_delay = 0.01
    worker = _worker(engine, max_active=1)
    running = worker.submit_generation(_request("a", 10_000))
    it = iter(running)
    next(it)
    queued = worker.submit_generation(_request("b", 1))
    assert not worker.drain(timeout=0.05)
    worker.stop()
    with pytest.raises(ShuttingDownError):
        list(queued)
    assert not worker.alive
    assert "a" in engine.closed
    with pytest.raises(ShuttingDownError):
        list(it)


class _Cancellable:
    """Like the engine's Generation: cancel() closes and summarises what was generated."""

    def __init__(self, inner: Iterator[object]) -> None:
        self.inner, self.tokens = inner, 0

    def __iter__(self) -> _Cancellable:
        return self

    def __next__(self) -> object:
        event = next(self.inner)
        self.tokens += isinstance(event, StepEvent)
        return event

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]

    def cancel(self) -> GenerationSummary:
        self.close()
        return _summary(self.tokens, "cancelled")


def test_stop_gives_running_streams_a_cancelled_summary(engine: ScriptedEngine) -> None:
    engine.step_delay = 0.01
    worker = Worker(
        _hub(), _config(), generate_fn=lambda h, r, p: _Cancellable(engine(h, r, p))
    ).start()
    it = iter(worker.submit_generation(_request("a", 10_000)))
    next(it)
    worker.drain(timeout=0.02)
    worker.stop()
    last = list(it)[-1]
    assert isinstance(last, GenerationResult)
    assert last.summary.finish_reason == "cancelled"

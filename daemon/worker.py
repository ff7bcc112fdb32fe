"""The engine worker: the one thread that owns MLX.

MLX is not safe to drive from several threads, so every model forward pass, KV cache, adapter
swap and training step happens here. RPC threads submit jobs and read each job's own result
queue; errors travel through that queue as exceptions. Work per round:

1. run queued calls (one-shot functions such as an adapter swap) and start queued tasks;
2. admit waiting generations up to `server.max_active`;
3. advance every active generation by one engine event (one prefill chunk or one speculative
   step), so all clients stream at once; the target and draft passes their steps need are
   collected and run as shared forwards (engine/batch.py), so a round costs little more than one step;
4. only when no generation is active: advance one background task (training) by one step.

A cancelled job is dropped before its next step and its generator closed, which releases its
KV caches in the engine's `finally`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from speclora.daemon.engine.events import (
    EngineEvent,
    ForwardPass,
    GenerationRequest,
    GenerationSummary,
    StepEvent,
    StepTrace,
    TextChunk,
)
from speclora.daemon.engine.output import Generation
from speclora.daemon.errors import (
    DeadlineError,
    PreconditionError,
    QueueFullError,
    ShuttingDownError,
    SpecLoRAError,
)
from speclora.daemon.memory import (
    IDLE_RELEASE_S,
    release_free_memory,
    trim_heap,
    under_memory_pressure,
)
from speclora.daemon.state import ModelHub
from speclora.daemon.stats import DraftSteps, StatsTracker
from speclora.shared.config import Config, SpeculationConfig

log = structlog.get_logger(__name__)

T = TypeVar("T")
GenerateFn = Callable[[ModelHub, GenerationRequest, list[int] | None], Iterator[EngineEvent]]
TaskFactory = Callable[[ModelHub], Iterator[Any]]

_END = object()


@dataclass(frozen=True)
class GenerationResult:
    """The engine's summary plus what only the worker knows about the request."""

    summary: GenerationSummary
    request_id: str
    adapter_version: str
    failure_recorded: bool


@dataclass(frozen=True)
class _Failure:
    error: BaseException


JOB_END = _END  # what a `deliver_to` sink receives after a job's last event


class Job(Generic[T]):
    """Something submitted to the worker. Iterate it (from one RPC thread) for its events, or
    have them delivered (`deliver_to`) where no thread may block on them."""

    def __init__(self, kind: str, on_cancel: Callable[[Job[Any]], None]) -> None:
        self.kind = kind
        self._results: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self._sink: Callable[[object], None] | None = None
        self._sink_lock = threading.RLock()  # a sink may cancel its job from inside

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the job before its next step; safe from any thread, any number of times.

        Suitable as a grpc `context.add_callback`: it never blocks on the worker.
        """
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        self._put(_END)  # wake a reader blocked on this job
        self._on_cancel(self)

    def abort(self, error: BaseException) -> None:
        """End the job with `error` for its reader (e.g. the daemon is shutting down)."""
        self._put(_Failure(error))
        self.cancel()

    def deliver_to(self, sink: Callable[[object], None]) -> None:
        """Hand the events to `sink` as they come instead of to an iterating reader (for an
        event loop, which must not block on a queue; a thread per reader would cost a thread
        switch per event). `sink(event)` per event, then `sink(JOB_END)`, or `sink(error)`
        with the exception that ends the job. It runs in the thread that produced the item
        (mostly the worker's), so it must be quick and must not block."""
        with self._sink_lock:
            while True:
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    break
                self._forward(sink, item)
            self._sink = sink

    def _put(self, item: object) -> None:
        with self._sink_lock:
            if self._sink is None:
                self._results.put(item)
            else:
                self._forward(self._sink, item)

    @staticmethod
    def _forward(sink: Callable[[object], None], item: object) -> None:
        try:
            sink(item.error if isinstance(item, _Failure) else item)
        except Exception:  # never let a reader's bug reach the worker's loop
            log.exception("job_sink_failed")

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._results.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]

    def result(self, timeout: float | None = None) -> T:
        """The first event: for calls, their return value."""
        try:
            item = self._results.get(timeout=timeout)
        except queue.Empty:
            self.cancel()  # a call that has not started yet never will
            raise DeadlineError(
                f"the engine did not get to {self.kind} within {timeout:.1f} s (it is busy); "
                "retry later"
            ) from None
        if isinstance(item, _Failure):
            raise item.error
        if item is _END:
            raise ShuttingDownError("the job was cancelled before it ran")
        return item  # type: ignore[return-value]

    # Worker side.
    def _emit(self, event: object) -> None:
        self._put(event)

    def _fail(self, error: BaseException) -> None:
        self._put(_Failure(error))
        self._put(_END)

    def _finish(self) -> None:
        self._put(_END)


class GenerateJob(Job[TextChunk | GenerationResult]):
    def __init__(
        self,
        request: GenerationRequest,
        prompt_tokens: list[int] | None,
        on_cancel: Callable[[Job[Any]], None],
    ) -> None:
        super().__init__("generate", on_cancel)
        self.request = request
        self.prompt_tokens = prompt_tokens


class TaskJob(Job[Any]):
    def __init__(
        self,
        name: str,
        factory: TaskFactory,
        on_cancel: Callable[[Job[Any]], None],
        trigger: str = "manual",
    ) -> None:
        super().__init__(name, on_cancel)
        self.factory = factory
        self.trigger = trigger  # "auto" when the daemon started it by itself


class CallJob(Job[Any]):
    def __init__(
        self, name: str, fn: Callable[[ModelHub], Any], on_cancel: Callable[[Job[Any]], None]
    ) -> None:
        super().__init__(name, on_cancel)
        self.fn = fn


@dataclass
class _Running:
    """A generation or task the worker is advancing (worker thread only)."""

    job: Job[Any]
    events: Iterator[Any]
    adapter_version: str = ""
    tokens: int = 0
    head_restricted: bool = True  # the draft head it was started with (HeadChoice)
    # Per source: speculative steps, and [i]: steps accepting proposal i (traced steps only).
    drafts: Counter[str] = field(default_factory=Counter)
    accepted_at: dict[str, list[int]] = field(default_factory=dict)
    last_event: Any = None  # a task's last event (a training run's TrainResult)

    def count_step(self, trace: StepTrace | None) -> None:
        if trace is None or trace.k == 0:
            return
        self.drafts[trace.source] += 1
        at = self.accepted_at.setdefault(trace.source, [])
        for i in range(trace.accepted):
            if i == len(at):
                at.append(0)
            at[i] += 1

    def draft_steps(self) -> DraftSteps:
        return DraftSteps(
            tuple(sorted(self.drafts.items())),
            tuple((source, tuple(at)) for source, at in sorted(self.accepted_at.items())),
        )


def engine_generate(spec: SpeculationConfig) -> GenerateFn:
    """The real engine, bound to the daemon's speculation settings. It also hands the engine
    what earlier requests left in the hub: their target caches (the prompt cache), the
    acceptance the current adapter version showed (adaptive K starts from it, so a draft known
    to be useless opens with a one-token probe, not a K = adaptive_start step), the history of
    past requests (the history drafter) and its calibration."""

    def run(
        hub: ModelHub, request: GenerationRequest, prompt_tokens: list[int] | None
    ) -> Iterator[EngineEvent]:
        from speclora.daemon.engine import (
            AcceptanceMemory,
            HistoryMemory,
            build_prompt_tokens,
            generate,
        )

        history = None
        if hub.history is not None and request.mode == "detailed":
            if prompt_tokens is None:
                prompt_tokens = build_prompt_tokens(hub.tokenizer, request)
            history = hub.history.for_request(prompt_tokens)
        vocab, prices = hub.extras.get("draft_vocab"), hub.extras.get("prices")
        choice = hub.extras.get("head_choice")
        if choice is not None and not choice.use_restricted:
            vocab, prices = None, choice.full_prices
        head = "restricted" if vocab is not None else "full"
        return generate(
            hub.target,
            hub.draft,
            hub.tokenizer,
            request,
            spec,
            draft_vocab=vocab,
            prompt_tokens=prompt_tokens,
            prices=prices,
            # Acceptance differs by head, so each keeps its own memory.
            acceptance_memory=hub.acceptance.setdefault(
                (hub.adapter_version, head), AcceptanceMemory()
            ),
            history=history,
            history_memory=hub.extras.setdefault("history_memory", HistoryMemory()),
            history_config=hub.history.config if hub.history is not None else None,
            prompt_cache=hub.prompt_cache,
            draft_tag=hub.adapter_version,
            batch_width=hub.extras.get("batch_width"),
        )

    return run


class Worker:
    """Owns the ModelHub and the one MLX thread; everything else talks to it through jobs."""

    def __init__(
        self,
        hub: ModelHub,
        config: Config,
        *,
        stats: StatsTracker | None = None,
        recorder: Any | None = None,
        generate_fn: GenerateFn | None = None,
        idle_release_s: float = IDLE_RELEASE_S,
    ) -> None:
        self.hub = hub
        self.config = config
        self.stats = stats or StatsTracker(timeline_requests=config.server.timeline_requests)
        # learning.FailureRecorder or None: .offer(..., on_stored=callback) -> bool (queued)
        self.recorder = recorder
        self._generate = generate_fn or engine_generate(config.speculation)
        self._queue_size = config.server.queue_size
        self._max_active = config.server.max_active
        self._batch_passes = config.server.batch_passes
        self._cond = threading.Condition()
        # Guarded by _cond:
        self._pending: deque[GenerateJob] = deque()
        self._controls: deque[Job[Any]] = deque()
        self._active_count = 0  # admitted generations, including those starting this round
        self._task_jobs: dict[str, TaskJob] = {}  # queued or running, by name
        self._task_state: dict[str, str] = {}
        self._accepting = True
        self._stopping = False
        # Worker thread only:
        self._active: list[_Running] = []
        self._tasks: deque[_Running] = deque()
        self.idle_since = time.monotonic()
        # MLX's buffer cache is kept while serving (reusing buffers is what it is for; on Metal
        # allocating them is costly) and emptied only after this long idle, or under pressure.
        self._idle_release_s = idle_release_s
        self._released = True  # nothing to release before the first request
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)

    # ------------------------------------------------------------------ RPC-thread API

    def start(self) -> Worker:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Generations waiting for a slot."""
        return len(self._pending)

    @property
    def active_count(self) -> int:
        return self._active_count

    @property
    def idle_seconds(self) -> float:
        """How long the worker has had nothing to do (0 while busy): the auto-train trigger."""
        if self._active_count or self._pending or self._task_jobs:
            return 0.0
        return time.monotonic() - self.idle_since

    def task_state(self, name: str) -> str:
        """'running', 'failed' (the last run raised) or 'idle'."""
        with self._cond:
            return self._task_state.get(name, "idle")

    def submit_generation(
        self, request: GenerationRequest, prompt_tokens: list[int] | None = None
    ) -> GenerateJob:
        """Queue a generation; iterate the job for TextChunks then one GenerationResult.

        `prompt_tokens` (from build_prompt_tokens, already counted by the caller) spares the
        worker thread from tokenizing again."""
        job = GenerateJob(request, prompt_tokens, self._cancelled)
        with self._cond:
            self._check_accepting()
            if len(self._pending) >= self._queue_size:
                raise QueueFullError(
                    f"the engine queue is full ({self._queue_size} requests waiting, "
                    f"{self._active_count} running); retry later"
                )
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def submit_task(self, name: str, factory: TaskFactory, trigger: str = "manual") -> TaskJob:
        """Queue a background generator (training); one per name at a time.

        `factory(hub)` runs in the worker thread and returns an iterator the worker advances one
        step per round while no generation is active. Each yielded item is one event for the
        job's reader; close() on the iterator is how cancellation reaches it.
        """
        job = TaskJob(name, factory, self._cancelled, trigger)
        with self._cond:
            self._check_accepting()
            if name in self._task_jobs:
                raise PreconditionError(f"{name} is already running; wait for it to finish")
            self._task_jobs[name] = job
            self._task_state[name] = "running"
            self._controls.append(job)
            self._cond.notify_all()
        return job

    def call(self, name: str, fn: Callable[[ModelHub], T], timeout: float | None = None) -> T:
        """Run `fn(hub)` in the worker between steps and return its result (or raise its error)."""
        return self.submit_call(name, fn).result(timeout)

    def submit_call(self, name: str, fn: Callable[[ModelHub], Any]) -> CallJob:
        """Queue `fn(hub)` for the worker's next round; `job.result(timeout)` waits for it.
        A job cancelled before the worker reaches it (client gone, deadline) never runs."""
        job = CallJob(name, fn, self._cancelled)
        with self._cond:
            self._check_accepting()
            self._controls.append(job)
            self._cond.notify_all()
        return job

    def drain(self, timeout: float) -> bool:
        """Stop taking jobs, abort background tasks, and wait up to `timeout` s for the running
        and queued generations to finish. True when none is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            for job in list(self._task_jobs.values()):
                job.abort(ShuttingDownError(f"the daemon is shutting down; {job.kind} stopped"))
            while self._pending or self._active_count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            drained = not (self._pending or self._active_count)
        return drained

    def stop(self, timeout: float = 10.0) -> None:
        """Fail whatever is left with UNAVAILABLE, release its caches, end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("worker_stop_timeout", seconds=timeout)

    # ------------------------------------------------------------------ internals

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise ShuttingDownError("the daemon is shutting down; not taking new requests")
        if not self._thread.is_alive():
            raise ShuttingDownError("the engine worker is not running")

    def _cancelled(self, job: Job[Any]) -> None:
        with self._cond:
            if isinstance(job, GenerateJob) and job in self._pending:
                # Never reached the engine: just forget it.
                self._pending.remove(job)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while self._round():
                pass
        except BaseException as exc:  # a bug in the loop itself: fail everyone, loudly
            log.exception("worker_crashed")
            self._fail_everything(exc)
            raise

    def _round(self) -> bool:
        with self._cond:
            while not (
                self._pending or self._controls or self._active or self._tasks or self._stopping
            ):
                if self._released:
                    self._cond.wait()
                    continue
                left = self.idle_since + self._idle_release_s - time.monotonic()
                if left <= 0:
                    self._release_memory("idle")
                else:
                    self._cond.wait(left)
            if self._stopping:
                controls, pending = list(self._controls), list(self._pending)
                self._controls.clear()
                self._pending.clear()
            else:
                controls = list(self._controls)
                self._controls.clear()
                room = self._max_active - len(self._active)
                pending = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                self._active_count += len(pending)
        if self._stopping:
            self._end_at_shutdown(controls + pending)
            return False

        for job in controls:
            if isinstance(job, CallJob):
                self._run_call(job)
            elif isinstance(job, TaskJob):
                self._start_task(job)
        for job in pending:
            self._start_generation(job)
        if pending:
            self._set_active_count()
        if self._active:
            self._step_generations()
            trim_heap()  # this round's heap holes (memory.py)
        elif self._tasks:
            self._step_task(self._tasks[0])
            self._tasks.rotate(-1)
        if not (self._active or self._tasks):
            self._went_idle()
        return True

    def _run_call(self, job: CallJob) -> None:
        if job.cancelled:
            return
        try:
            value = job.fn(self.hub)
        except Exception as exc:
            job._fail(exc)
        else:
            job._emit(value)
            job._finish()

    # Generations -------------------------------------------------------

    def _start_generation(self, job: GenerateJob) -> None:
        if job.cancelled:
            return
        try:
            events = self._generate(self.hub, job.request, job.prompt_tokens)
        except Exception as exc:
            job._fail(exc)
            return
        choice = self.hub.extras.get("head_choice")
        self._active.append(
            _Running(
                job,
                events,
                adapter_version=self.hub.adapter_version,
                head_restricted=choice.use_restricted if choice is not None else True,
            )
        )
        log.debug("generation_started", request_id=job.request.request_id)

    def _step_generations(self) -> None:
        """One event from every active generation. A generation that needs a model pass first
        hands it over (a ForwardPass) and waits; the waiting passes then run as one batched
        forward, their logits go back, and so on until every generation has its event."""
        from speclora.daemon.engine.batch import BatchWidth, run_passes

        waiting: list[tuple[_Running, ForwardPass]] = []
        for running in list(self._active):
            self._step_generation(running, waiting)
        while waiting:
            batch, waiting = waiting, []
            try:
                if self._batch_passes:
                    results, forwards = run_passes([p for _, p in batch])
                else:
                    results, forwards = [p.run() for _, p in batch], len(batch)
            except Exception as exc:  # e.g. out of memory building the pass: fail its rows
                for running, _ in batch:
                    self._step_generation(running, waiting, error=exc)
                continue
            self.stats.record_batch(forwards, len(batch), sum(p.width for _, p in batch))
            target = [p.width for _, p in batch if p.model is self.hub.target]
            if target and self._batch_passes:
                width = self.hub.extras.setdefault("batch_width", BatchWidth())
                width.tokens, width.rows = sum(target), len(target)
            for (running, _), logits in zip(batch, results, strict=True):
                self._step_generation(running, waiting, logits=logits)

    def _step_generation(
        self,
        running: _Running,
        waiting: list[tuple[_Running, ForwardPass]],
        *,
        logits: Any = None,
        error: Exception | None = None,
    ) -> None:
        """Advance one generation to its next event (or to its next ForwardPass, into
        `waiting`), sending it the logits of the pass it waited for, or the pass's error."""
        job = running.job
        if job.cancelled:
            self._retire(running)
            self.stats.record_cancelled(running.tokens)
            log.info(
                "generation_cancelled", request_id=job.request.request_id, tokens=running.tokens
            )
            return
        events = running.events
        try:
            if error is not None:
                event = events.fail_pass(error)
            elif isinstance(events, Generation):
                event = events.advance(logits)
            else:  # a plain iterator of events (an engine that never asks for passes)
                event = next(events)
        except StopIteration:
            self._retire(running)
            job._fail(RuntimeError("the engine ended a generation without a summary"))
            return
        except Exception as exc:
            self._retire(running)
            self._forward_error(job, exc)
            return
        if isinstance(event, ForwardPass):
            waiting.append((running, event))
        elif isinstance(event, StepEvent):
            running.count_step(event.trace)
            if event.chunk is not None and event.chunk.token_ids:
                running.tokens += len(event.chunk.token_ids)
                job._emit(event.chunk)
        elif isinstance(event, GenerationSummary):
            self._finish_generation(running, event)
        # PrefillProgress has no wire form; it only marks a bounded slice of work.

    def _finish_generation(self, running: _Running, summary: GenerationSummary) -> None:
        job: GenerateJob = running.job  # type: ignore[assignment]
        request = job.request
        version = running.adapter_version

        def send(recorded: bool) -> None:
            job._emit(GenerationResult(summary, request.request_id, version, recorded))
            job._finish()

        queued = False
        if self.recorder is not None:
            try:
                # A failure case's summary waits for its commit (the recorder's thread calls
                # `send`, this one never waits), so failure_recorded=True survives a kill -9.
                queued = bool(
                    self.recorder.offer(
                        summary,
                        request,
                        self.hub.target_name,
                        self.hub.draft_name,
                        version,
                        on_stored=send,
                    )
                )
            except Exception:  # recording is best effort; the answer still goes out
                log.exception("failure_record_failed", request_id=request.request_id)
        self._record_history(request, summary)
        self.stats.record(summary, version, running.draft_steps())
        vocab = self.hub.extras.get("draft_vocab")
        if vocab is not None:  # the restricted draft head follows what the target writes
            choice = self.hub.extras.get("head_choice")
            if choice is not None and summary.draft_proposed:
                served = running.head_restricted
                choice.observe(
                    vocab,
                    served,
                    summary.completion_token_ids,
                    summary.from_draft,
                    summary.rejection_positions,
                )
                if choice.use_restricted != served:
                    log.info(
                        "draft_head_chosen",
                        head="restricted" if choice.use_restricted else "full",
                        acceptance_restricted=choice.acceptance(True),
                        acceptance_full=choice.acceptance(False),
                    )
            vocab.observe(summary.completion_token_ids)
        self._retire(running)
        log.info(
            "generation_finished",
            request_id=request.request_id,
            mode=summary.mode,
            prompt_tokens=summary.prompt_tokens,
            cached_prompt_tokens=summary.cached_prompt_tokens,
            tokens=summary.completion_tokens,
            proposed=summary.proposed,
            accepted=summary.accepted,
            acceptance=round(summary.acceptance_rate, 3),
            tokens_per_second=round(summary.tokens_per_second, 1),
            finish_reason=summary.finish_reason,
            adapter_version=version,
            failure_case_queued=queued,
        )
        if not queued:
            send(False)

    def _record_history(self, request: GenerationRequest, summary: GenerationSummary) -> None:
        """Every finished request teaches the history drafter (what the target wrote and its
        prompt), unless the client or the config said not to record; never fails the
        request: the history queues it and commits it off this thread."""
        history = self.hub.history
        if (
            history is None
            or not (request.record and self.config.learning.record)
            or summary.finish_reason == "cancelled"
            or not summary.completion_token_ids
        ):
            return
        try:
            history.record(summary.prompt_token_ids, summary.completion_token_ids)
        except Exception:
            log.exception("history_record_failed", request_id=request.request_id)

    def _retire(self, running: _Running) -> None:
        self._close(running)
        self._active.remove(running)
        self._set_active_count()

    def _set_active_count(self) -> None:
        with self._cond:
            self._active_count = len(self._active)
            self._cond.notify_all()  # drain() waits on this

    # Tasks -------------------------------------------------------------

    def _start_task(self, job: TaskJob) -> None:
        if job.cancelled:
            self._end_task(job, "idle")
            return
        self.stats.task_started(job.kind)
        began = time.perf_counter()  # the factory (a run's checks, reading its cases) is a slice
        try:
            events = job.factory(self.hub)
        except Exception as exc:
            self._forward_error(job, exc)
            self._end_task(job, "failed")
            return
        finally:
            self.stats.record_slice(job.kind, time.perf_counter() - began)
        self._tasks.append(_Running(job, events))
        if job.trigger == "auto":
            self.stats.record_auto_start(job.kind)

    def _step_task(self, running: _Running) -> None:
        job = running.job
        if job.cancelled:
            self._close(running)
            self._tasks.remove(running)
            self._end_task(job, "idle", "cancelled")
            log.info("task_cancelled", task=job.kind)
            return
        began = time.perf_counter()
        try:
            event = next(running.events)
        except StopIteration:
            self._tasks.remove(running)
            job._finish()
            # A task's last event may name its outcome (a training run's: promoted, rejected).
            outcome = getattr(running.last_event, "outcome", "finished")
            self._end_task(job, "idle", outcome, running.last_event)
        except Exception as exc:
            self._close(running)
            self._tasks.remove(running)
            self._forward_error(job, exc)
            self._end_task(job, "failed", "failed")
        else:
            # Generation waits at most one slice: what Stats' training_slice_max_s reports.
            self.stats.record_slice(job.kind, time.perf_counter() - began)
            running.last_event = event
            self.stats.record_task_event(job.kind, event)
            job._emit(event)

    def _end_task(
        self, job: Job[Any], state: str, outcome: str | None = None, last_event: object = None
    ) -> None:
        with self._cond:
            self._task_jobs.pop(job.kind, None)
            self._task_state[job.kind] = state
        if outcome is not None:
            self.stats.record_task(job.kind, outcome, last_event)

    # Shared ------------------------------------------------------------

    @staticmethod
    def _close(running: _Running) -> None:
        close = getattr(running.events, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            log.exception("job_close_failed", job=running.job.kind)

    @staticmethod
    def _forward_error(job: Job[Any], exc: Exception) -> None:
        # Expected errors and bugs both go to the reader, who maps them; if the reader is gone,
        # a bug must still leave a traceback in the log.
        if job.cancelled and not isinstance(exc, SpecLoRAError):
            log.error("job_failed_after_cancel", job=job.kind, exc_info=exc)
        job._fail(exc)

    def _fail_everything(self, error: BaseException, extra: Sequence[Job[Any]] = ()) -> None:
        for running in [*self._active, *self._tasks]:
            self._close(running)
            running.job._fail(error)
        for job in extra:
            job._fail(error)
        self._active.clear()
        self._tasks.clear()
        with self._cond:
            self._active_count = 0
            for job in [*self._pending, *self._controls]:
                job._fail(error)
            self._pending.clear()
            self._controls.clear()
            self._task_jobs.clear()
            self._cond.notify_all()

    def _end_at_shutdown(self, waiting: Sequence[Job[Any]]) -> None:
        """Streams still running get their summary with finish_reason "cancelled" (a finished
        stream, not an error); work that never started gets UNAVAILABLE."""
        for running in list(self._active):
            cancel = getattr(running.events, "cancel", None)
            if cancel is None:
                continue
            try:
                summary = cancel()
            except Exception:
                log.exception("cancel_failed", request_id=running.job.request.request_id)
                continue
            # What the engine still held back goes out first, so the chunks add up.
            chunk = getattr(running.events, "final_chunk", None)
            if chunk is not None and chunk.token_ids:
                running.tokens += len(chunk.token_ids)
                running.job._emit(chunk)
            self._finish_generation(running, summary)
        self._fail_everything(
            ShuttingDownError("the daemon shut down before this request finished"), extra=waiting
        )

    def _went_idle(self) -> None:
        self.idle_since = time.monotonic()
        self._released = False
        if under_memory_pressure():
            self._release_memory("memory_pressure")

    def _release_memory(self, reason: str) -> None:
        """Return MLX's cached buffers and the heap's free pages to the OS (worker thread)."""
        release_free_memory()
        self._released = True
        log.debug("memory_released", reason=reason)

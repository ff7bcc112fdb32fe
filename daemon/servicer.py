"""The gRPC servicer: protobuf <-> domain at the edge, validation, and the one error mapping.

Every field a client sends is checked here, before anything reaches the worker, and a bad one
is INVALID_ARGUMENT with the field's name in the message. Domain errors map to status codes in
`status_for`; anything else is a bug: INTERNAL, logged with its traceback. Nothing a client
sends may end in UNKNOWN.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import grpc
import structlog
from speclora.daemon import blas
from speclora.daemon.engine.events import (
    ChatTurn,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)
from speclora.daemon.engine.prompt import build_prompt_tokens
from speclora.daemon.errors import (
    AdapterError,
    InvalidRequestError,
    ModelError,
    PreconditionError,
    QueueFullError,
    ShuttingDownError,
    SpecLoRAError,
)
from speclora.daemon.learning.adapters import AdapterInfo
from speclora.daemon.learning.events import (
    TrainEvaluation,
    TrainParams,
    TrainProgress,
    TrainResult,
    TrainStarted,
)
from speclora.daemon.state import ModelHub
from speclora.daemon.stats import StatsSnapshot, memory_usage
from speclora.daemon.worker import GenerationResult, TaskFactory, Worker
from speclora.shared.config import Config
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

import speclora

log = structlog.get_logger(__name__)

MAX_DRAFT_TOKENS = 16
MAX_TRAIN_STEPS = 100_000
TRAINING_TASK = "training"

_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TRAIN_EVENTS = (
    (TrainStarted, "started", pb.TrainStarted),
    (TrainProgress, "progress", pb.TrainProgress),
    (TrainEvaluation, "evaluation", pb.TrainEvaluation),
    (TrainResult, "result", pb.TrainResult),
)
_MODE_FROM_PB = {pb.MODE_DETAILED: "detailed", pb.MODE_FAST: "fast"}
_MODE_TO_PB = {v: k for k, v in _MODE_FROM_PB.items()}
_FINISH_TO_PB = {
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_string": pb.FINISH_REASON_STOP_STRING,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}

# The one mapping from domain errors to status codes (most specific first).
_STATUS: tuple[tuple[type[SpecLoRAError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: SpecLoRAError) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


class LearningLoop(Protocol):
    """What the servicer needs from the learning loop, in domain terms."""

    def training_task(self, params: TrainParams) -> TaskFactory:
        """A factory the worker calls in its thread: factory(hub) -> Iterator[TrainEvent]."""

    def activate(self, hub: ModelHub, version: str | None) -> AdapterInfo | None:
        """Swap `version` into hub.draft (None = roll back; "none" = base draft). Worker thread;
        returns the now active adapter, None for the base draft."""

    def failure_counts(self) -> tuple[int, int]:
        """(failure cases stored, cases recorded since the last training run)."""


# ---------------------------------------------------------------------- validation


def _check_range(field: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(field, f"must be a finite number, got {value}")
    below = value <= lo if lo_open else value < lo
    if below or value > hi:
        bounds = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InvalidRequestError(field, f"{value} is outside {bounds}")


def generation_request_from_pb(
    msg: pb.GenerateRequest, config: Config, request_id: str
) -> GenerationRequest:
    """Validate every field and apply the daemon's defaults."""
    g, s = config.generation, config.speculation
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else g.max_tokens
    _check_range("max_tokens", max_tokens, 1, g.max_tokens_cap)
    temperature = msg.temperature if msg.HasField("temperature") else g.temperature
    _check_range("temperature", temperature, 0.0, 2.0)
    top_p = msg.top_p if msg.HasField("top_p") else g.top_p
    _check_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    top_k = msg.top_k if msg.HasField("top_k") else g.top_k
    if top_k < 0:
        raise InvalidRequestError("top_k", f"must be >= 0 (0 = off), got {top_k}")
    seed = msg.seed if msg.HasField("seed") else None
    if seed is not None and seed < 0:
        raise InvalidRequestError("seed", f"must be >= 0, got {seed}")
    if len(msg.stop) > g.max_stop_strings:
        raise InvalidRequestError("stop", f"{len(msg.stop)} strings; at most {g.max_stop_strings}")
    for i, text in enumerate(msg.stop):
        if not text:
            raise InvalidRequestError(f"stop[{i}]", "is empty")
        if len(text) > g.max_stop_string_chars:
            raise InvalidRequestError(
                f"stop[{i}]", f"{len(text)} characters; at most {g.max_stop_string_chars}"
            )
    draft_tokens = msg.draft_tokens if msg.HasField("draft_tokens") else s.draft_tokens
    if draft_tokens is not None:
        _check_range("draft_tokens", draft_tokens, 0, MAX_DRAFT_TOKENS)
    if msg.mode == pb.MODE_UNSPECIFIED:
        mode = s.mode
    elif msg.mode in _MODE_FROM_PB:
        mode = _MODE_FROM_PB[msg.mode]
    else:
        raise InvalidRequestError("mode", f"unknown value {msg.mode} (MODE_DETAILED or MODE_FAST)")
    return GenerationRequest(
        prompt=msg.prompt,
        messages=tuple(ChatTurn(m.role, m.content) for m in msg.messages),
        raw=msg.raw,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        stop=tuple(msg.stop),
        draft_tokens=draft_tokens,
        mode=mode,  # type: ignore[arg-type]
        record=msg.record if msg.HasField("record") else True,
        request_id=request_id,
    )


def prompt_tokens_within_limits(
    request: GenerationRequest, hub: ModelHub, max_prompt_tokens: int
) -> list[int]:
    """Template and tokenize the prompt (no MLX); it plus max_tokens must fit the context."""
    tokens = build_prompt_tokens(hub.tokenizer, request)
    n = len(tokens)
    field = "messages" if request.messages else "prompt"
    if n > max_prompt_tokens:
        raise InvalidRequestError(
            field, f"{n} tokens after templating; the limit is {max_prompt_tokens}"
        )
    if n + request.max_tokens > hub.max_context:
        raise InvalidRequestError(
            "max_tokens",
            f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
            f"model's context of {hub.max_context} tokens",
        )
    return tokens


def train_params_from_pb(msg: pb.TrainRequest) -> TrainParams:
    if msg.HasField("steps"):
        _check_range("steps", msg.steps, 1, MAX_TRAIN_STEPS)
    if msg.HasField("max_cases") and msg.max_cases < 2:
        raise InvalidRequestError(
            "max_cases", f"must be >= 2 (one to train, one to hold out), got {msg.max_cases}"
        )
    if msg.HasField("learning_rate"):
        _check_range("learning_rate", msg.learning_rate, 0.0, 1.0, lo_open=True)
    return TrainParams(
        steps=msg.steps if msg.HasField("steps") else None,
        max_cases=msg.max_cases if msg.HasField("max_cases") else None,
        learning_rate=msg.learning_rate if msg.HasField("learning_rate") else None,
        force_promote=msg.force_promote,
    )


def adapter_version_from_pb(msg: pb.ActivateAdapterRequest) -> str | None:
    """None means roll back. Versions are names inside the adapters dir, never paths."""
    if msg.rollback:
        return None
    if not msg.version:
        raise InvalidRequestError(
            "version", "is empty (give a version such as v0003, 'none', or rollback)"
        )
    if not _VERSION_NAME.fullmatch(msg.version):
        raise InvalidRequestError("version", f"{msg.version[:80]!r} is not an adapter version name")
    return msg.version


def check_stats_request(msg: pb.StatsRequest) -> float:
    interval = msg.interval_s if msg.HasField("interval_s") else 1.0
    _check_range("interval_s", interval, 0.1, 3600.0)
    return interval


# ---------------------------------------------------------------------- conversion


def chunk_to_pb(chunk: TextChunk) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        chunk=pb.TextChunk(
            text=chunk.text, token_ids=list(chunk.token_ids), from_draft=list(chunk.from_draft)
        )
    )


def result_to_pb(result: GenerationResult) -> pb.GenerateEvent:
    s = result.summary
    return pb.GenerateEvent(
        summary=pb.GenerationSummary(
            request_id=result.request_id,
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
            proposed=s.proposed,
            accepted=s.accepted,
            acceptance_rate=s.acceptance_rate,
            tokens_per_second=s.tokens_per_second,
            time_to_first_token_s=s.time_to_first_token_s,
            finish_reason=_FINISH_TO_PB[s.finish_reason],
            adapter_version=result.adapter_version,
            failure_recorded=result.failure_recorded,
            target_passes=s.target_passes,
            tokens_per_step=s.tokens_per_step,
            mode=_MODE_TO_PB[s.mode],
            total_time_s=s.total_time_s,
            cached_prompt_tokens=s.cached_prompt_tokens,
        )
    )


def train_event_to_pb(event: object) -> pb.TrainEvent | None:
    """None for events that only mark a slice of work (TrainTick)."""
    for kind, field, message in _TRAIN_EVENTS:
        if isinstance(event, kind):
            return pb.TrainEvent(**{field: message(**dataclasses.asdict(event))})
    return None


def adapter_to_pb(info: AdapterInfo | None) -> pb.AdapterInfo:
    if info is None:  # the base draft
        return pb.AdapterInfo(version="", active=True, status="base")
    return pb.AdapterInfo(
        version=info.version,
        active=info.active,
        parent=info.parent,
        acceptance_before=info.acceptance_before,
        acceptance_after=info.acceptance_after,
        status=info.status,
    )


def snapshot_to_pb(snap: StatsSnapshot) -> pb.StatsSnapshot:
    return pb.StatsSnapshot(
        target_model=snap.target_model,
        draft_model=snap.draft_model,
        adapter_version=snap.adapter_version,
        uptime_s=snap.uptime_s,
        requests_total=snap.requests_total,
        requests_active=snap.requests_active,
        tokens_total=snap.tokens_total,
        prompt_tokens_total=snap.prompt_tokens_total,
        prompt_tokens_cached=snap.prompt_tokens_cached,
        acceptance_lifetime=snap.acceptance_lifetime,
        acceptance_recent=snap.acceptance_recent,
        acceptance_history=list(snap.acceptance_history),
        per_adapter=[
            pb.AdapterAcceptance(
                adapter_version=a.adapter_version,
                requests=a.requests,
                proposed=a.proposed,
                accepted=a.accepted,
                acceptance_rate=a.acceptance_rate,
            )
            for a in snap.per_adapter
        ],
        tokens_per_second_recent=snap.tokens_per_second_recent,
        failure_cases=snap.failure_cases,
        pending_cases=snap.pending_cases,
        training_state=snap.training_state,
        queue_depth=snap.queue_depth,
        rss_bytes=snap.rss_bytes,
        peak_rss_bytes=snap.peak_rss_bytes,
        weight_bytes=snap.weight_bytes,
        prompt_cache_bytes=snap.prompt_cache_bytes,
        blas=snap.blas,
        version=snap.version,
        default_mode=_MODE_TO_PB[snap.default_mode],
    )


# ---------------------------------------------------------------------- the service


def add_to_server(servicer: SpecLoRAServicer, server: grpc.Server) -> None:
    """Register the service, parsing request bytes ourselves.

    grpc answers a request its deserializer cannot parse (garbage, invalid UTF-8 in a string)
    with INTERNAL, which we reserve for bugs; here it is INVALID_ARGUMENT naming the message.
    """
    service = pb.DESCRIPTOR.services_by_name["SpecLoRA"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_stream_rpc_method_handler(
            _parsing(getattr(servicer, method.name), request_cls),
            request_deserializer=None,  # raw bytes
            response_serializer=response_cls.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)


def _parsing(behavior: Any, request_cls: Any) -> Any:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = request_cls.FromString(raw)
        except Exception as exc:  # DecodeError and friends: the bytes, not us
            name = request_cls.DESCRIPTOR.full_name
            log.info("rpc_rejected", code="INVALID_ARGUMENT", error=f"unparsable {name}: {exc}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {name} ({exc})")
        return behavior(request, context)

    return handle


class SpecLoRAServicer(pb_grpc.SpecLoRAServicer):
    """Thin handlers: validate, submit to the worker, stream its events back."""

    def __init__(
        self, worker: Worker, config: Config, learning: LearningLoop | None = None
    ) -> None:
        self._worker = worker
        self._config = config
        self._learning = learning
        self._shutting_down = threading.Event()
        # One event per open Stats watch; set when its client goes away or the daemon stops.
        self._watch_wakers: weakref.WeakSet[threading.Event] = weakref.WeakSet()
        self._watch_lock = threading.Lock()

    def begin_shutdown(self) -> None:
        """Watchers end and new calls are refused with UNAVAILABLE."""
        self._shutting_down.set()
        with self._watch_lock:
            wakers = list(self._watch_wakers)
        for waker in wakers:
            waker.set()

    @contextmanager
    def _rpc(self, name: str, context: grpc.ServicerContext) -> Iterator[str]:
        """Bind the RPC's log context and map every error to a status code, in one place."""
        request_id = uuid.uuid4().hex[:16]
        with structlog.contextvars.bound_contextvars(rpc=name, request_id=request_id):
            try:
                if self._shutting_down.is_set():
                    raise ShuttingDownError("the daemon is shutting down")
                yield request_id
            except SpecLoRAError as exc:
                code = status_for(exc)
                log.info("rpc_rejected", code=code.name, error=str(exc))
                context.abort(code, str(exc))
            except Exception as exc:
                log.error("rpc_internal_error", error=repr(exc), exc_info=exc)
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal error ({type(exc).__name__}: {exc}); request {request_id} "
                    "in the daemon log has the traceback",
                )

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateEvent]:
        with self._rpc("Generate", context) as request_id:
            domain = generation_request_from_pb(request, self._config, request_id)
            prompt = prompt_tokens_within_limits(
                domain, self._worker.hub, self._config.generation.max_prompt_tokens
            )
            job = self._worker.submit_generation(domain, prompt)
            if not context.add_callback(job.cancel):
                job.cancel()  # the client is already gone
            log.info(
                "generation_queued",
                prompt_tokens=len(prompt),
                max_tokens=domain.max_tokens,
                mode=domain.mode,
                queue_depth=self._worker.queue_depth,
            )
            for event in job:
                if isinstance(event, GenerationResult):
                    yield result_to_pb(event)
                else:
                    yield chunk_to_pb(event)

    def Stats(
        self, request: pb.StatsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StatsSnapshot]:
        with self._rpc("Stats", context):
            interval = check_stats_request(request)
            # A watcher sleeps between snapshots; a cancelled one must wake at once, or it holds
            # a server thread and a concurrency slot for up to interval_s (an hour).
            waker = threading.Event()
            with self._watch_lock:
                self._watch_wakers.add(waker)
            if not context.add_callback(waker.set) or self._shutting_down.is_set():
                waker.set()
            yield snapshot_to_pb(self.snapshot())
            while request.watch:
                waker.wait(interval)
                if self._shutting_down.is_set():
                    raise ShuttingDownError("the daemon is shutting down")
                if not context.is_active():
                    return
                yield snapshot_to_pb(self.snapshot())

    def Train(
        self, request: pb.TrainRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TrainEvent]:
        with self._rpc("Train", context):
            params = train_params_from_pb(request)
            learning = self._require_learning()
            job = self._worker.submit_task(TRAINING_TASK, learning.training_task(params))
            if not context.add_callback(job.cancel):
                job.cancel()
            for event in job:
                message = train_event_to_pb(event)
                if message is not None:
                    yield message

    def ActivateAdapter(
        self, request: pb.ActivateAdapterRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AdapterInfo]:
        with self._rpc("ActivateAdapter", context):
            version = adapter_version_from_pb(request)
            learning = self._require_learning()
            info = self._worker.call(
                "activate_adapter", lambda hub: learning.activate(hub, version)
            )
            yield adapter_to_pb(info)

    def _require_learning(self) -> LearningLoop:
        if self._learning is None:
            raise PreconditionError("the learning loop is not available in this daemon")
        return self._learning

    def snapshot(self) -> StatsSnapshot:
        """Assemble a stats snapshot without waiting for the worker."""
        worker, hub = self._worker, self._worker.hub
        serving = worker.stats.snapshot()
        failures, pending = self._learning.failure_counts() if self._learning else (0, 0)
        rss, peak = memory_usage()
        history = hub.history.stats() if hub.history is not None else None
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
            training_state=worker.task_state(TRAINING_TASK),
            queue_depth=worker.queue_depth,
            rss_bytes=rss,
            peak_rss_bytes=peak,
            weight_bytes=hub.weight_bytes,
            prompt_cache_bytes=hub.prompt_cache.stats().bytes if hub.prompt_cache else 0,
            blas=blas.blas_info().name,
            version=speclora.__version__,
            default_mode=self._config.speculation.mode,  # type: ignore[arg-type]
            history_documents=history.documents if history else 0,
            history_tokens=history.tokens if history else 0,
            history_bytes=history.bytes if history else 0,
        )

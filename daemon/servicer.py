"""The gRPC servicer: protobuf <-> domain at the edge, and error kinds -> status codes.

Every field a client sends is checked before anything reaches the worker, by the validation
every transport shares (daemon.requests); a bad one is INVALID_ARGUMENT with the field's name in
the message. Domain errors map by kind (daemon.errors) to status codes in `status_for`; anything
else is a bug: INTERNAL, logged with its traceback. Nothing a client sends may end in UNKNOWN.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import grpc
import structlog
from speclora.daemon.engine.events import GenerationRequest, TextChunk
from speclora.daemon.errors import (
    ErrorKind,
    InvalidRequestError,
    PreconditionError,
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
from speclora.daemon.requests import (
    check_range,
    generation_request,
    prompt_tokens_within_limits,
)
from speclora.daemon.state import ModelHub
from speclora.daemon.stats import TRAINING_TASK, StatsSnapshot, daemon_snapshot
from speclora.daemon.worker import GenerationResult, TaskFactory, Worker
from speclora.shared.config import Config
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

MAX_TRAIN_STEPS = 100_000

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

# Each kind of domain error (daemon.errors, the one classification) has one status code.
_STATUS = {kind: grpc.StatusCode[kind.name] for kind in ErrorKind}


def status_for(exc: SpecLoRAError) -> grpc.StatusCode:
    return _STATUS[exc.kind]


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


def generation_request_from_pb(
    msg: pb.GenerateRequest, config: Config, request_id: str
) -> GenerationRequest:
    """Unpack the message (unset optional fields -> None) into the one shared validation."""
    if msg.mode != pb.MODE_UNSPECIFIED and msg.mode not in _MODE_FROM_PB:
        raise InvalidRequestError("mode", f"unknown value {msg.mode} (MODE_DETAILED or MODE_FAST)")

    def optional(name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    return generation_request(
        config,
        request_id,
        prompt=msg.prompt,
        messages=[(m.role, m.content) for m in msg.messages],
        raw=msg.raw,
        max_tokens=optional("max_tokens"),
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        top_k=optional("top_k"),
        seed=optional("seed"),
        stop=list(msg.stop),
        draft_tokens=optional("draft_tokens"),
        mode=_MODE_FROM_PB.get(msg.mode),
        record=optional("record"),
        use_history=optional("use_history"),
    )


def train_params_from_pb(msg: pb.TrainRequest) -> TrainParams:
    if msg.HasField("steps"):
        check_range("steps", msg.steps, 1, MAX_TRAIN_STEPS)
    if msg.HasField("max_cases") and msg.max_cases < 2:
        raise InvalidRequestError(
            "max_cases", f"must be >= 2 (one to train, one to hold out), got {msg.max_cases}"
        )
    if msg.HasField("learning_rate"):
        check_range("learning_rate", msg.learning_rate, 0.0, 1.0, lo_open=True)
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
    check_range("interval_s", interval, 0.1, 3600.0)
    return interval


# ---------------------------------------------------------------------- conversion


def chunk_to_pb(chunk: TextChunk) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        chunk=pb.TextChunk(
            text=chunk.text,
            token_ids=list(chunk.token_ids),
            from_draft=list(chunk.from_draft),
            from_history=list(chunk.from_history),
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
            draft_proposed=s.draft_proposed,
            draft_accepted=s.draft_accepted,
            history_proposed=s.history_proposed,
            history_accepted=s.history_accepted,
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
        draft_proposed=snap.sources.draft_proposed,
        draft_accepted=snap.sources.draft_accepted,
        history_proposed=snap.sources.history_proposed,
        history_accepted=snap.sources.history_accepted,
        draft_acceptance_recent=snap.sources.draft_acceptance_recent,
        history_acceptance_recent=snap.sources.history_acceptance_recent,
        history_tokens=snap.history.tokens,
        history_documents=snap.history.documents,
        history_bytes=snap.history.bytes,
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
        counts = self._learning.failure_counts if self._learning else None
        return daemon_snapshot(self._worker, self._config.speculation.mode, counts)  # type: ignore[arg-type]

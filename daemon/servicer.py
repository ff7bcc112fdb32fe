"""The gRPC servicer: protobuf <-> domain at the edge, and error kinds -> status codes.

Every field a client sends is checked before anything reaches the worker, by the validation
every transport shares (daemon.requests); a bad one is INVALID_ARGUMENT with the field's name in
the message and in a google.rpc.BadRequest in the status details. Domain errors map by kind
(daemon.errors) to status codes in `status_for`; anything else is a bug: INTERNAL, logged with
its traceback. Nothing a client sends may end in UNKNOWN. Adapters and failure cases are asked
of the learning loop (daemon.learning.operations) in domain terms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
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
from speclora.daemon.learning.operations import CheckedAdapter, PurgeResult
from speclora.daemon.learning.store import FailureCase, StoreStats
from speclora.daemon.requests import (
    check_range,
    check_within,
    generation_request,
    prompt_tokens_within_limits,
)
from speclora.daemon.state import ModelHub
from speclora.daemon.stats import TRAINING_TASK, LastTraining, StatsSnapshot, daemon_snapshot
from speclora.daemon.worker import GenerationResult, TaskFactory, Worker
from speclora.shared.config import Config, LearningConfig, bounds
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

MAX_TRAIN_STEPS = 100_000
_MAX_TRAIN_S = bounds(LearningConfig, "max_train_s")  # a run's time budget, as the config's
MAX_LIST_CASES = 1000
DEFAULT_LIST_CASES = 20
# Longest an adapter swap waits for the engine when the caller set no deadline.
ACTIVATE_TIMEOUT_S = 60.0
REQUEST_ID_METADATA_KEY = "x-request-id"

_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRAIN_EVENTS = (
    (TrainStarted, "started", pb.TrainStarted),
    (TrainProgress, "progress", pb.TrainProgress),
    (TrainResult, "result", pb.TrainResult),
)
_MODE_FROM_PB = {pb.MODE_DETAILED: "detailed", pb.MODE_FAST: "fast"}
_MODE_TO_PB = {v: k for k, v in _MODE_FROM_PB.items()}
_FINISH_TO_PB = {
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_string": pb.FINISH_REASON_STOP_STRING,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "grammar_incomplete": pb.FINISH_REASON_GRAMMAR_INCOMPLETE,
}
_TRAINING_STATE_TO_PB = {
    "idle": pb.TRAINING_STATE_IDLE,
    "running": pb.TRAINING_STATE_RUNNING,
    "failed": pb.TRAINING_STATE_FAILED,
}
_PHASE_TO_PB = {"before": pb.EVALUATION_PHASE_BEFORE, "after": pb.EVALUATION_PHASE_AFTER}
_ADAPTER_STATUS_TO_PB = {
    "promoted": pb.ADAPTER_STATUS_PROMOTED,
    "rejected": pb.ADAPTER_STATUS_REJECTED,
    "corrupt": pb.ADAPTER_STATUS_CORRUPT,
    "base": pb.ADAPTER_STATUS_BASE,
}
_BLAS_TO_PB = {
    "reference": pb.BLAS_REFERENCE,
    "openblas": pb.BLAS_OPENBLAS,
    "mkl": pb.BLAS_MKL,
    "accelerate": pb.BLAS_ACCELERATE,
}

# Each kind of domain error (daemon.errors, the one classification) has one status code.
_STATUS = {kind: grpc.StatusCode[kind.name] for kind in ErrorKind}


def status_for(exc: SpecLoRAError) -> grpc.StatusCode:
    return _STATUS[exc.kind]


class LearningLoop(Protocol):
    """What the servicer needs from the learning loop, in domain terms
    (`speclora.daemon.learning.operations.Learning`)."""

    def training_task(self, params: TrainParams) -> TaskFactory:
        """A factory the worker calls in its thread: factory(hub) -> Iterator[TrainEvent]."""

    def activate(self, hub: ModelHub, version: str, *, force: bool = False) -> AdapterInfo | None:
        """Swap `version` into hub.draft ("none" = base draft); worker thread. The gate holds
        unless `force`. Returns the now active adapter, None for the base draft."""

    def rollback(self, hub: ModelHub) -> AdapterInfo | None:
        """Back to the previously active adapter; worker thread."""

    def list_adapters(self) -> list[AdapterInfo]: ...

    def get_adapter(self, version: str) -> CheckedAdapter: ...

    @property
    def adapters_dir(self) -> Any: ...

    def failure_counts(self) -> tuple[int, int]:
        """(failure cases stored, cases recorded since the last training run)."""

    def list_cases(
        self, limit: int, before_id: int | None = None
    ) -> tuple[list[FailureCase], int]: ...

    def get_case(self, case_id: int) -> FailureCase: ...

    def iter_cases(self) -> Iterator[FailureCase]: ...

    def failure_stats(self) -> StoreStats: ...

    @property
    def database_path(self) -> Any: ...

    def purge(self) -> PurgeResult: ...

    def purge_history(self) -> int: ...


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
        **_structured_output(msg),
    )


def _structured_output(msg: pb.GenerateRequest) -> dict[str, Any]:
    """The oneof's field, as generation_request takes it (it validates and compiles)."""
    which = msg.WhichOneof("structured_output")
    return {which: getattr(msg, which)} if which else {}


def train_params_from_pb(msg: pb.TrainRequest) -> TrainParams:
    if msg.HasField("steps"):
        check_range("steps", msg.steps, 1, MAX_TRAIN_STEPS)
    if msg.HasField("max_cases") and msg.max_cases < 2:
        raise InvalidRequestError(
            "max_cases", f"must be >= 2 (one to train, one to hold out), got {msg.max_cases}"
        )
    if msg.HasField("learning_rate"):
        check_range("learning_rate", msg.learning_rate, 0.0, 1.0, lo_open=True)
    if msg.HasField("max_train_s"):
        check_within("max_train_s", msg.max_train_s, _MAX_TRAIN_S)
    return TrainParams(
        steps=msg.steps if msg.HasField("steps") else None,
        max_cases=msg.max_cases if msg.HasField("max_cases") else None,
        learning_rate=msg.learning_rate if msg.HasField("learning_rate") else None,
        force_promote=msg.force_promote,
        max_train_s=msg.max_train_s if msg.HasField("max_train_s") else None,
    )


def adapter_version_from_pb(msg: pb.ActivateAdapterRequest) -> str | None:
    """None means roll back (the deprecated `rollback` field). Versions are names inside the
    adapters dir, never paths."""
    if msg.rollback:
        return None
    return check_version("version", msg.version, allow_empty=False)


def check_version(field: str, version: str, *, allow_empty: bool) -> str:
    if not version:
        if allow_empty:
            return ""
        raise InvalidRequestError(field, "is empty (give a version such as v0003, or 'none')")
    if not _VERSION_NAME.fullmatch(version):
        raise InvalidRequestError(field, f"{version[:80]!r} is not an adapter version name")
    return version


def check_stats_request(msg: pb.StatsRequest) -> float:
    interval = msg.interval_s if msg.HasField("interval_s") else 1.0
    check_range("interval_s", interval, 0.1, 3600.0)
    return interval


def list_cases_from_pb(msg: pb.ListFailureCasesRequest) -> tuple[int, int | None]:
    limit = msg.limit if msg.HasField("limit") else DEFAULT_LIST_CASES
    check_range("limit", limit, 1, MAX_LIST_CASES)
    before = msg.before_id if msg.HasField("before_id") else None
    if before is not None and before < 1:
        raise InvalidRequestError("before_id", f"must be >= 1, got {before}")
    return limit, before


def check_case_id(case_id: int) -> int:
    if case_id < 1:
        raise InvalidRequestError("id", f"must be >= 1 (case ids start at 1), got {case_id}")
    return case_id


def request_id_for(context: grpc.ServicerContext, explicit: str = "") -> tuple[str, str | None]:
    """(the request's id, an error about the caller's id or None). The caller's id (a field,
    else the x-request-id metadata) is used when it is a valid one; else a fresh one."""
    given = explicit
    if not given:
        given = next(
            (v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_METADATA_KEY),
            "",
        )
    if not given:
        return uuid.uuid4().hex[:16], None
    if isinstance(given, str) and _REQUEST_ID.fullmatch(given):
        return given, None
    return uuid.uuid4().hex[:16], (
        f"{str(given)[:80]!r} is not a request id (1 to 64 letters, digits or ._:-)"
    )


# ---------------------------------------------------------------------- conversion


def chunk_to_pb(chunk: TextChunk) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        chunk=pb.TextChunk(
            text=chunk.text,
            token_ids=list(chunk.token_ids),
            from_draft=list(chunk.from_draft),
            from_history=list(chunk.from_history),
            from_grammar=list(chunk.from_grammar),
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
            grammar_proposed=s.grammar_proposed,
            grammar_accepted=s.grammar_accepted,
        )
    )


def train_event_to_pb(event: object) -> pb.TrainEvent | None:
    """None for events that only mark a slice of work (TrainTick)."""
    if isinstance(event, TrainEvaluation):
        return pb.TrainEvent(
            evaluation=pb.TrainEvaluation(
                phase=_PHASE_TO_PB.get(event.phase, pb.EVALUATION_PHASE_UNSPECIFIED),
                phase_name=event.phase,
                heldout_acceptance=event.heldout_acceptance,
            )
        )
    for kind, field, message in _TRAIN_EVENTS:
        if isinstance(event, kind):
            values = {k: v for k, v in dataclasses.asdict(event).items() if v is not None}
            return pb.TrainEvent(**{field: message(**values)})
    return None


def adapter_to_pb(
    info: AdapterInfo | None, *, integrity: str = "", active: str | None = None
) -> pb.AdapterInfo:
    """`active`: the version the daemon serves, when known better than the pointer file."""
    if info is None:  # the base draft
        return pb.AdapterInfo(
            version="", active=True, status=pb.ADAPTER_STATUS_BASE, status_name="base"
        )
    return pb.AdapterInfo(
        version=info.version,
        active=info.active if active is None else info.version == active,
        parent=info.parent,
        acceptance_before=info.acceptance_before,
        acceptance_after=info.acceptance_after,
        status=_ADAPTER_STATUS_TO_PB.get(info.status, pb.ADAPTER_STATUS_UNSPECIFIED),
        status_name=info.status,
        reason=info.reason,
        created_at=info.created_at,
        path=str(info.path) if info.path else "",
        integrity=integrity,
        metadata_json=json.dumps(info.metadata, sort_keys=True) if info.metadata else "",
    )


def case_to_pb(case: FailureCase) -> pb.FailureCase:
    return pb.FailureCase(
        id=case.id or 0,
        created_at=case.created_at,
        request_id=case.request_id,
        prompt_ids=list(case.prompt_ids),
        completion_ids=list(case.completion_ids),
        from_draft=list(case.from_draft),
        rejection_positions=list(case.rejection_positions),
        proposed=case.proposed,
        accepted=case.accepted,
        acceptance=case.acceptance,
        temperature=case.temperature,
        top_p=case.top_p,
        top_k=case.top_k,
        seed=case.seed,
        mode=_MODE_TO_PB.get(case.mode, pb.MODE_UNSPECIFIED),  # type: ignore[call-overload]
        finish_reason=_FINISH_TO_PB.get(case.finish_reason, pb.FINISH_REASON_UNSPECIFIED),  # type: ignore[call-overload]
        target_id=case.target_id,
        draft_id=case.draft_id,
        adapter_version=case.adapter_version,
    )


def failure_stats_to_pb(stats: StoreStats, path: Any) -> pb.FailureStats:
    return pb.FailureStats(
        cases=stats.cases,
        pending=stats.pending,
        oldest=stats.oldest,
        newest=stats.newest,
        mean_acceptance=stats.mean_acceptance,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        per_adapter=[
            pb.AdapterCaseCount(adapter_version=v, cases=n) for v, n in stats.per_adapter.items()
        ],
        file_bytes=stats.file_bytes,
        database_path=str(path),
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
        training_state=_TRAINING_STATE_TO_PB.get(
            snap.training_state, pb.TRAINING_STATE_UNSPECIFIED
        ),
        training_state_name=snap.training_state,
        queue_depth=snap.queue_depth,
        rss_bytes=snap.rss_bytes,
        peak_rss_bytes=snap.peak_rss_bytes,
        weight_bytes=snap.weight_bytes,
        prompt_cache_bytes=snap.prompt_cache_bytes,
        blas=_BLAS_TO_PB.get(snap.blas, pb.BLAS_UNSPECIFIED),
        blas_name=snap.blas,
        blas_skinny_rows=snap.blas_skinny_rows,
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
        pid=os.getpid(),
        failure_store_error=snap.failure_store_error,
        auto_train=snap.auto_train.enabled,
        auto_train_state=snap.auto_train.state,
        auto_train_idle_s=snap.auto_train.idle_s,
        auto_train_min_new_cases=snap.auto_train.min_new_cases,
        auto_train_runs=snap.auto_train.runs,
        last_training=_last_training_to_pb(snap.last_training),
        training_slice_max_s=snap.training_slice_max_s,
        idle_s=snap.idle_s,
    )


def _last_training_to_pb(last: LastTraining | None) -> pb.LastTraining | None:
    if last is None:
        return None
    return pb.LastTraining(
        adapter_version=last.adapter_version,
        promoted=last.promoted,
        reason=last.reason,
        acceptance_before=last.acceptance_before,
        acceptance_after=last.acceptance_after,
        duration_s=last.duration_s,
        finished_at=last.finished_at,
        trigger=last.trigger,
    )


def _bad_request_status(exc: InvalidRequestError) -> grpc.Status:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming the field, so a client reads the
    field without parsing the message (which still starts with "field: ")."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.detail)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=[detail])
    return rpc_status.to_status(status)


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
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
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
            error = InvalidRequestError("request", f"not a valid {name} ({exc})")
            context.abort_with_status(_bad_request_status(error))
        return behavior(request, context)

    return handle


class SpecLoRAServicer(pb_grpc.SpecLoRAServicer):
    """Thin handlers: validate, submit to the worker (or read the stores), convert back."""

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
    def _rpc(
        self, name: str, context: grpc.ServicerContext, explicit_id: str = ""
    ) -> Iterator[str]:
        """Bind the RPC's log context and map every error to a status code, in one place."""
        request_id, bad_id = request_id_for(context, explicit_id)
        with structlog.contextvars.bound_contextvars(rpc=name, request_id=request_id):
            try:
                if self._shutting_down.is_set():
                    raise ShuttingDownError("the daemon is shutting down")
                if bad_id is not None:
                    raise InvalidRequestError("request_id", bad_id)
                yield request_id
            except InvalidRequestError as exc:
                log.info("rpc_rejected", code="INVALID_ARGUMENT", error=str(exc))
                context.abort_with_status(_bad_request_status(exc))
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

    # -- generation -------------------------------------------------------------------

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateEvent]:
        received = time.perf_counter()  # TTFT and total time count from here, queue included
        with self._rpc("Generate", context, request.request_id) as request_id:
            domain = dataclasses.replace(
                generation_request_from_pb(request, self._config, request_id),
                received_at=received,
            )
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

    # -- statistics -------------------------------------------------------------------

    def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.ServicerContext
    ) -> pb.StatsSnapshot:
        with self._rpc("GetStats", context):
            return snapshot_to_pb(self.snapshot())

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

    # -- training ---------------------------------------------------------------------

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

    # -- adapters ---------------------------------------------------------------------

    def ActivateAdapter(
        self, request: pb.ActivateAdapterRequest, context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        with self._rpc("ActivateAdapter", context):
            version = adapter_version_from_pb(request)
            learning = self._require_learning()
            if version is None:
                return self._swap("rollback_adapter", learning.rollback, context)
            return self._swap(
                "activate_adapter",
                lambda hub: learning.activate(hub, version, force=request.force),
                context,
            )

    def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        with self._rpc("RollbackAdapter", context):
            learning = self._require_learning()
            return self._swap("rollback_adapter", learning.rollback, context)

    def _swap(self, name: str, fn: Any, context: grpc.ServicerContext) -> pb.AdapterInfo:
        """Run an adapter change in the worker without holding this thread past the caller's
        deadline (else ACTIVATE_TIMEOUT_S); a caller that leaves first cancels it, and a
        cancelled change that has not started never runs."""
        job = self._worker.submit_call(name, fn)
        if not context.add_callback(job.cancel):
            job.cancel()
        remaining = context.time_remaining()
        timeout = ACTIVATE_TIMEOUT_S if remaining is None else min(remaining, ACTIVATE_TIMEOUT_S)
        info = job.result(timeout=max(timeout, 0.0))
        log.info("adapter_changed", version=info.version if info else "none")
        return adapter_to_pb(info)

    def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> pb.ListAdaptersResponse:
        with self._rpc("ListAdapters", context):
            learning = self._require_learning()
            serving = self._worker.hub.adapter_version
            return pb.ListAdaptersResponse(
                adapters=[adapter_to_pb(i, active=serving) for i in learning.list_adapters()],
                active_version=serving,
                adapters_dir=str(learning.adapters_dir),
            )

    def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        with self._rpc("GetAdapter", context):
            version = check_version("version", request.version, allow_empty=True)
            checked = self._require_learning().get_adapter(version)
            return adapter_to_pb(
                checked.info, integrity=checked.integrity, active=self._worker.hub.adapter_version
            )

    # -- failure cases ----------------------------------------------------------------

    def ListFailureCases(
        self, request: pb.ListFailureCasesRequest, context: grpc.ServicerContext
    ) -> pb.ListFailureCasesResponse:
        with self._rpc("ListFailureCases", context):
            limit, before = list_cases_from_pb(request)
            cases, total = self._require_learning().list_cases(limit, before)
            return pb.ListFailureCasesResponse(cases=[case_to_pb(c) for c in cases], total=total)

    def GetFailureCase(
        self, request: pb.GetFailureCaseRequest, context: grpc.ServicerContext
    ) -> pb.FailureCase:
        with self._rpc("GetFailureCase", context):
            case_id = check_case_id(request.id)
            return case_to_pb(self._require_learning().get_case(case_id))

    def ExportFailureCases(
        self, request: pb.ExportFailureCasesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FailureCase]:
        with self._rpc("ExportFailureCases", context):
            n = 0
            for case in self._require_learning().iter_cases():
                if not context.is_active():
                    return
                yield case_to_pb(case)
                n += 1
            log.info("failure_cases_exported", cases=n)

    def GetFailureStats(
        self, request: pb.GetFailureStatsRequest, context: grpc.ServicerContext
    ) -> pb.FailureStats:
        with self._rpc("GetFailureStats", context):
            learning = self._require_learning()
            return failure_stats_to_pb(learning.failure_stats(), learning.database_path)

    def PurgeFailureCases(
        self, request: pb.PurgeFailureCasesRequest, context: grpc.ServicerContext
    ) -> pb.PurgeFailureCasesResponse:
        with self._rpc("PurgeFailureCases", context):
            result = self._require_learning().purge()
            log.info(
                "failure_cases_purged",
                cases=result.failure_cases,
                history_requests=result.history_requests,
            )
            return pb.PurgeFailureCasesResponse(
                deleted=result.failure_cases, history_deleted=result.history_requests
            )

    def PurgeHistory(
        self, request: pb.PurgeHistoryRequest, context: grpc.ServicerContext
    ) -> pb.PurgeHistoryResponse:
        with self._rpc("PurgeHistory", context):
            deleted = self._require_learning().purge_history()
            log.info("history_purged", requests=deleted)
            return pb.PurgeHistoryResponse(deleted=deleted)

    def _require_learning(self) -> LearningLoop:
        if self._learning is None:
            raise PreconditionError("the learning loop is not available in this daemon")
        return self._learning

    def snapshot(self) -> StatsSnapshot:
        """Assemble a stats snapshot without waiting for the worker."""
        counts = self._learning.failure_counts if self._learning else None
        return daemon_snapshot(self._worker, self._config.speculation.mode, counts)  # type: ignore[arg-type]

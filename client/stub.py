"""SpecLoRAClient: the Python API to a running daemon. Never imports MLX.

    from speclora.client import SpecLoRAClient

    with SpecLoRAClient() as client:
        print(client.generate_text("Explain quantum computing simply."))
        for event in client.generate("Write a haiku", temperature=0.7):
            ...  # TextChunk ..., then one GenerationSummary

Errors are exceptions named for what the caller can do about them (DaemonNotRunning,
InvalidRequest, NotFound, DaemonBusy, ...); gRPC status objects never leak out.

The client reads only where the daemon is and, for TCP, its token (client/settings.py); it
never loads the daemon's configuration, so a newer daemon's keys cannot break it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from speclora.client.settings import read_token, resolve_settings  # noqa: F401 (re-export)
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

DEFAULT_CONNECT_TIMEOUT_S = 3.0
# Replies can be large (a page of failure cases); the daemon bounds what it accepts itself.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
TOKEN_METADATA_KEY = "authorization"
REQUEST_ID_METADATA_KEY = "x-request-id"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecLoRA"].full_name


# ---------------------------------------------------------------------- errors


class SpecLoRAClientError(Exception):
    """Base of every error the client raises."""


class DaemonNotRunning(SpecLoRAClientError):
    """Nothing answers at the address (no socket, or a stale one)."""

    def __init__(self, address: str, detail: str = "") -> None:
        self.address = address
        self.socket_path = address.removeprefix("unix:") if address.startswith("unix:") else None
        where = f"no daemon at {self.socket_path or address}"
        super().__init__(
            f"the SpecLoRA daemon is not running ({where}{': ' + detail if detail else ''}); "
            "start it with: speclora daemon start"
        )


class InvalidRequest(SpecLoRAClientError):
    """A request field is out of range; `field` names it (from the status's BadRequest
    details when the daemon sent them, else from the message's "field: ..." prefix)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = (
            field if field is not None else (message.split(":", 1)[0] if ":" in message else "")
        )


class NotFound(SpecLoRAClientError):
    """No adapter version or failure case of that name or id."""


class DeadlineExceeded(SpecLoRAClientError):
    """The call did not finish in time (the engine was busy)."""


class DaemonBusy(SpecLoRAClientError):
    """The daemon's queue is full; retry later."""


class PreconditionFailed(SpecLoRAClientError):
    """The daemon's state forbids this now (e.g. training already running)."""


class DaemonShuttingDown(SpecLoRAClientError):
    """The daemon is stopping and took no new work."""


class Unauthenticated(SpecLoRAClientError):
    """TCP without the right token."""


class DaemonError(SpecLoRAClientError):
    """Anything else, including daemon bugs (INTERNAL); the message says where to look."""


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...]
    from_draft: tuple[bool, ...]  # per token: proposed by the model draft, accepted
    from_history: tuple[bool, ...] = ()  # per token: proposed by the history drafter, accepted
    from_grammar: tuple[bool, ...] = ()  # per token: forced by the request's grammar, accepted


@dataclass(frozen=True)
class GenerationSummary:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    proposed: int
    accepted: int
    acceptance_rate: float
    tokens_per_second: float
    time_to_first_token_s: float
    finish_reason: str  # "eos" | "length" | "stop_string" | "cancelled" | "grammar_incomplete"
    adapter_version: str
    failure_recorded: bool
    target_passes: int
    tokens_per_step: float
    mode: str  # "detailed" | "fast"
    total_time_s: float
    cached_prompt_tokens: int
    # By source (they add up to proposed/accepted).
    draft_proposed: int = 0
    draft_accepted: int = 0
    history_proposed: int = 0
    history_accepted: int = 0
    grammar_proposed: int = 0  # tokens the request's grammar forced (no draft pass)
    grammar_accepted: int = 0


@dataclass(frozen=True)
class AdapterAcceptance:
    adapter_version: str
    requests: int
    proposed: int
    accepted: int
    acceptance_rate: float


@dataclass(frozen=True)
class StatsSnapshot:
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
    training_state: str
    queue_depth: int
    rss_bytes: int
    peak_rss_bytes: int
    weight_bytes: int
    prompt_cache_bytes: int
    blas: str
    version: str
    default_mode: str
    blas_skinny_rows: int = 0  # products of up to this many rows in the skinny kernel; 0: off
    # By source since start (acceptance_* above count both), and the history drafter's size.
    draft_proposed: int = 0
    draft_accepted: int = 0
    history_proposed: int = 0
    history_accepted: int = 0
    draft_acceptance_recent: float = 0.0
    history_acceptance_recent: float = 0.0
    history_tokens: int = 0
    history_documents: int = 0
    history_bytes: int = 0
    pid: int = 0
    failure_store_error: str = ""  # why failure_cases is 0 when the database is unreadable
    # The learner running by itself (learning.auto_train): the rule, what it waits for now
    # ("off", "waiting_for_cases", "waiting_for_idle", "due", "running", ...), runs since start.
    auto_train: bool = False
    auto_train_state: str = ""
    auto_train_idle_s: float = 0.0
    auto_train_min_new_cases: int = 0
    auto_train_runs: int = 0
    last_training: LastTraining | None = None  # None until a run has finished since start
    training_slice_max_s: float = 0.0  # longest slice of the running or last training run
    idle_s: float = 0.0  # how long the daemon has had nothing to do

    @property
    def blas_label(self) -> str:
        """The BLAS as the daemon's own benches name it (BlasInfo.label): "openblas+skinny"
        where the skinny kernel runs in front of it."""
        return f"{self.blas}+skinny" if self.blas_skinny_rows else self.blas


@dataclass(frozen=True)
class LastTraining:
    """How the daemon's last training run since it started ended."""

    adapter_version: str
    promoted: bool
    reason: str
    acceptance_before: float
    acceptance_after: float
    duration_s: float
    finished_at: float  # Unix time
    trigger: str  # "auto" | "manual"


@dataclass(frozen=True)
class TrainStarted:
    train_cases: int
    heldout_cases: int
    steps: int
    parent_version: str


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total_steps: int
    loss: float
    tokens_per_second: float
    base_loss: float | None = None  # the starting draft's loss on the same batch


@dataclass(frozen=True)
class TrainEvaluation:
    phase: str  # "before" | "after"
    heldout_acceptance: float


@dataclass(frozen=True)
class TrainResult:
    adapter_version: str
    promoted: bool
    reason: str
    acceptance_before: float
    acceptance_after: float
    duration_s: float
    trigger: str = ""  # "auto" | "manual" ("" from a daemon that does not say)


@dataclass(frozen=True)
class AdapterInfo:
    version: str  # "" = the base draft
    active: bool
    parent: str
    acceptance_before: float
    acceptance_after: float
    status: str  # "promoted" | "rejected" | "corrupt" | "base"
    reason: str = ""
    created_at: float = 0.0
    path: str = ""  # on the daemon's machine
    integrity: str = ""  # get_adapter only: "ok" or what is wrong
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterList:
    adapters: tuple[AdapterInfo, ...]  # oldest first
    active_version: str  # "" = the base draft serves
    adapters_dir: str  # on the daemon's machine


@dataclass(frozen=True)
class FailureCase:
    """One recorded request; `to_json()` is the export format (one object per JSONL line)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    from_draft: tuple[bool, ...]
    rejection_positions: tuple[int, ...]
    proposed: int
    accepted: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    mode: str  # "detailed" | "fast" | ""
    finish_reason: str
    target_id: str
    draft_id: str
    adapter_version: str
    request_id: str
    created_at: float
    id: int
    acceptance: float

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("prompt_ids", "completion_ids", "from_draft", "rejection_positions"):
            data[key] = list(data[key])
        return data


@dataclass(frozen=True)
class FailureCaseList:
    cases: tuple[FailureCase, ...]  # newest first
    total: int  # stored in all


@dataclass(frozen=True)
class FailureStats:
    cases: int
    pending: int  # recorded since the last training run
    oldest: float | None
    newest: float | None
    mean_acceptance: float
    prompt_tokens: int
    completion_tokens: int
    per_adapter: dict[str, int]  # adapter version ("" = base draft) -> cases
    file_bytes: int
    database_path: str  # on the daemon's machine


GenerateEvent = TextChunk | GenerationSummary
TrainEvent = TrainStarted | TrainProgress | TrainEvaluation | TrainResult

_D = TypeVar("_D")


def _enum_name(value: int, enum: Any, prefix: str) -> str:
    """MODE_FAST -> "fast"; 0 (UNSPECIFIED) -> ""; a value this client does not know -> "7"."""
    if value == 0:
        return ""
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _from_pb(cls: type[_D], message: Any, **special: Any) -> _D:
    """Copy same-named fields; repeated fields become tuples."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in special:
            values[f.name] = special[f.name]
            continue
        value = getattr(message, f.name)
        values[f.name] = tuple(value) if not isinstance(value, (str, bytes, int, float)) else value
    return cls(**values)


def _summary(s: pb.GenerationSummary) -> GenerationSummary:
    return _from_pb(
        GenerationSummary,
        s,
        finish_reason=_enum_name(s.finish_reason, pb.FinishReason, "FINISH_REASON_"),
        mode=_enum_name(s.mode, pb.Mode, "MODE_"),
    )


def _stats(s: pb.StatsSnapshot) -> StatsSnapshot:
    return _from_pb(
        StatsSnapshot,
        s,
        per_adapter=tuple(_from_pb(AdapterAcceptance, a) for a in s.per_adapter),
        default_mode=_enum_name(s.default_mode, pb.Mode, "MODE_"),
        training_state=_enum_name(s.training_state, pb.TrainingState, "TRAINING_STATE_")
        or s.training_state_name,
        blas=s.blas_name or _enum_name(s.blas, pb.Blas, "BLAS_"),
        last_training=_from_pb(LastTraining, s.last_training)
        if s.HasField("last_training")
        else None,
    )


def _adapter(a: pb.AdapterInfo) -> AdapterInfo:
    try:
        metadata = json.loads(a.metadata_json) if a.metadata_json else {}
    except ValueError:
        metadata = {}
    return _from_pb(
        AdapterInfo,
        a,
        status=_enum_name(a.status, pb.AdapterStatus, "ADAPTER_STATUS_") or a.status_name,
        metadata=metadata,
    )


def _case(c: pb.FailureCase) -> FailureCase:
    return _from_pb(
        FailureCase,
        c,
        seed=c.seed if c.HasField("seed") else None,
        mode=_enum_name(c.mode, pb.Mode, "MODE_"),
        finish_reason=_enum_name(c.finish_reason, pb.FinishReason, "FINISH_REASON_"),
    )


def _train_event(event: pb.TrainEvent) -> TrainEvent:
    kind = event.WhichOneof("event")
    message = getattr(event, kind)
    if kind == "evaluation":
        phase = _enum_name(message.phase, pb.EvaluationPhase, "EVALUATION_PHASE_")
        return TrainEvaluation(phase or message.phase_name, message.heldout_acceptance)
    if kind == "progress":
        base = message.base_loss if message.HasField("base_loss") else None
        return _from_pb(TrainProgress, message, base_loss=base)
    return _from_pb(_TRAIN_KINDS[kind], message)


_TRAIN_KINDS = {
    "started": TrainStarted,
    "progress": TrainProgress,
    "evaluation": TrainEvaluation,
    "result": TrainResult,
}


def _bad_field(exc: grpc.RpcError) -> str | None:
    """The field a google.rpc.BadRequest in the status details names, if there is one."""
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                return bad.field_violations[0].field
    return None


# ---------------------------------------------------------------------- the client


class SpecLoRAClient:
    """A connection to the daemon. Thread-safe; cheap to create; close() or use `with`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        config_path: str | os.PathLike | None = None,
        token: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_message_bytes: int | None = None,
    ) -> None:
        """address: "unix:/path", a socket path, or "host:port" (TCP, then a token is sent:
        `token`, else SPECLORA_TOKEN, else the token file). None = SPECLORA_ADDRESS, else the
        configured socket (see speclora.client.settings)."""
        settings = resolve_settings(address, config_path=config_path, token=token)
        self.address = settings.address
        self._tcp = settings.tcp
        self._metadata = (
            ((TOKEN_METADATA_KEY, f"Bearer {settings.token}"),) if settings.token else ()
        )
        limit = max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES
        self._channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        self._stub = pb_grpc.SpecLoRAStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._connect_timeout = connect_timeout
        self._connected = False

    def __enter__(self) -> SpecLoRAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- connection and errors -----------------------------------------------------------

    def _connect(self) -> None:
        if self._connected:
            return
        if not self._tcp and not Path(self.address.removeprefix("unix:")).exists():
            raise DaemonNotRunning(self.address)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self._connect_timeout)
        except grpc.FutureTimeoutError:
            raise DaemonNotRunning(self.address, "nothing answers") from None
        self._connected = True

    @contextmanager
    def _errors(self) -> Iterator[None]:
        self._connect()
        try:
            yield
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: grpc.RpcError) -> SpecLoRAClientError:
        code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(details, _bad_field(exc))
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(details or "the call did not finish in time")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return DaemonBusy(details)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return PreconditionFailed(details)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return Unauthenticated(details)
        if code == grpc.StatusCode.UNAVAILABLE:
            if "shutting down" in details or "shut down" in details:
                return DaemonShuttingDown(details)
            return DaemonNotRunning(self.address, details)
        return DaemonError(f"{code.name}: {details}")

    def _stream(self, call: Any) -> Iterator[Any]:
        """Iterate a server stream; stopping early (break, close, Ctrl-C) cancels it."""
        try:
            with self._errors():
                yield from call
        finally:
            call.cancel()

    # -- RPCs -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[tuple[str, str] | dict[str, str]] | None = None,
        raw: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        draft_tokens: int | None = None,
        mode: str | None = None,
        record: bool | None = None,
        use_history: bool | None = None,
        request_id: str | None = None,
        json_schema: str | dict[str, Any] | None = None,
        json_object: bool = False,
        regex: str | None = None,
        lark: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[GenerateEvent]:
        """Stream a generation: TextChunks as they are accepted, then a GenerationSummary.

        messages: (role, content) pairs or {"role", "content"} dicts. Unset options take the
        daemon's configured defaults; draft_tokens None = adaptive, 0 = no speculation;
        use_history False = the model draft alone (no proposals from past requests).
        request_id: your id for the request, echoed in the summary and the daemon's log.
        Structured output (at most one): json_schema (a dict or its JSON text), json_object
        (any JSON object), regex, lark (a Lark grammar); detailed mode."""
        request = pb.GenerateRequest(
            prompt=prompt or "", raw=raw, stop=list(stop), request_id=request_id or ""
        )
        for m in messages or ():
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
            request.messages.add(role=role, content=content)
        optional = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "draft_tokens": draft_tokens,
            "record": record,
            "use_history": use_history,
        }
        for name, value in optional.items():
            if value is not None:
                setattr(request, name, value)
        if isinstance(json_schema, dict):
            json_schema = json.dumps(json_schema)
        structured = {"json_schema": json_schema, "regex": regex, "lark": lark}
        for name, value in structured.items():
            if value is not None:
                setattr(request, name, value)
        if json_object:
            request.json_object = True
        if mode is not None:
            try:
                request.mode = pb.Mode.Value(f"MODE_{mode.upper()}")
            except ValueError:
                raise InvalidRequest(f"mode: {mode!r} is not one of detailed, fast") from None
        with self._errors():
            call = self._stub.Generate(request, metadata=self._metadata, timeout=timeout)
        for event in self._stream(call):
            if event.HasField("chunk"):
                c = event.chunk
                yield TextChunk(
                    c.text,
                    tuple(c.token_ids),
                    tuple(c.from_draft),
                    tuple(c.from_history),
                    tuple(c.from_grammar),
                )
            else:
                yield _summary(event.summary)

    def generate_text(self, prompt: str | None = None, **options: Any) -> str:
        """The whole completion as one string (same options as generate)."""
        return "".join(e.text for e in self.generate(prompt, **options) if isinstance(e, TextChunk))

    def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        with self._errors():
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=timeout)

    def stats(self) -> StatsSnapshot:
        """One snapshot of the daemon's state."""
        return _stats(self._unary("GetStats", pb.GetStatsRequest()))

    def watch_stats(self, interval_s: float = 1.0) -> Iterator[StatsSnapshot]:
        """A snapshot every `interval_s` seconds until the caller stops iterating."""
        with self._errors():
            call = self._stub.Stats(
                pb.StatsRequest(watch=True, interval_s=interval_s), metadata=self._metadata
            )
        for snapshot in self._stream(call):
            yield _stats(snapshot)

    def train(
        self,
        *,
        steps: int | None = None,
        max_cases: int | None = None,
        learning_rate: float | None = None,
        force_promote: bool = False,
        max_train_s: float | None = None,
    ) -> Iterator[TrainEvent]:
        """Run a training session: TrainStarted, TrainEvaluation("before"), TrainProgress...,
        TrainEvaluation("after"), TrainResult. `max_train_s` bounds the whole run in seconds
        (0 = no limit; None = the daemon's learning.max_train_s)."""
        request = pb.TrainRequest(force_promote=force_promote)
        for name, value in (
            ("steps", steps),
            ("max_cases", max_cases),
            ("learning_rate", learning_rate),
            ("max_train_s", max_train_s),
        ):
            if value is not None:
                setattr(request, name, value)
        with self._errors():
            call = self._stub.Train(request, metadata=self._metadata)
        for event in self._stream(call):
            yield _train_event(event)

    # -- adapters -------------------------------------------------------------------------

    def activate_adapter(
        self,
        version: str | None = None,
        *,
        force: bool = False,
        rollback: bool = False,
        timeout: float | None = None,
    ) -> AdapterInfo:
        """Make `version` the active adapter ("none" = base draft). A version the promotion
        gate rejected raises PreconditionFailed unless `force`. rollback=True is
        rollback_adapter()."""
        if rollback:
            return self.rollback_adapter(timeout=timeout)
        request = pb.ActivateAdapterRequest(version=version or "", force=force)
        return _adapter(self._unary("ActivateAdapter", request, timeout))

    def rollback_adapter(self, *, timeout: float | None = None) -> AdapterInfo:
        """Back to the adapter that was active before the current one."""
        return _adapter(self._unary("RollbackAdapter", pb.RollbackAdapterRequest(), timeout))

    def list_adapters(self) -> AdapterList:
        reply = self._unary("ListAdapters", pb.ListAdaptersRequest())
        return AdapterList(
            tuple(_adapter(a) for a in reply.adapters), reply.active_version, reply.adapters_dir
        )

    def get_adapter(self, version: str | None = None) -> AdapterInfo:
        """One version (None = the active one) with `integrity` checked; NotFound if unknown."""
        return _adapter(self._unary("GetAdapter", pb.GetAdapterRequest(version=version or "")))

    # -- failure cases --------------------------------------------------------------------

    def list_failure_cases(
        self, limit: int | None = None, *, before_id: int | None = None
    ) -> FailureCaseList:
        """The newest cases (default 20, at most 1000), below `before_id` when given."""
        request = pb.ListFailureCasesRequest()
        if limit is not None:
            request.limit = limit
        if before_id is not None:
            request.before_id = before_id
        reply = self._unary("ListFailureCases", request)
        return FailureCaseList(tuple(_case(c) for c in reply.cases), reply.total)

    def get_failure_case(self, case_id: int) -> FailureCase:
        """One case; NotFound if there is no such id."""
        return _case(self._unary("GetFailureCase", pb.GetFailureCaseRequest(id=case_id)))

    def export_failure_cases(self) -> Iterator[FailureCase]:
        """Every case, oldest first, streamed."""
        with self._errors():
            call = self._stub.ExportFailureCases(
                pb.ExportFailureCasesRequest(), metadata=self._metadata
            )
        for case in self._stream(call):
            yield _case(case)

    def failure_stats(self) -> FailureStats:
        s = self._unary("GetFailureStats", pb.GetFailureStatsRequest())
        return _from_pb(
            FailureStats,
            s,
            oldest=s.oldest if s.HasField("oldest") else None,
            newest=s.newest if s.HasField("newest") else None,
            per_adapter={a.adapter_version: a.cases for a in s.per_adapter},
        )

    def purge_failure_cases(self) -> int:
        """Delete every recorded case for good (and the history of past requests, which holds
        the same prompts); returns how many cases were deleted."""
        return self.purge_recorded()[0]

    def purge_recorded(self) -> tuple[int, int]:
        """Delete every failure case and the history of past requests for good; returns
        (cases deleted, past requests deleted)."""
        reply = self._unary("PurgeFailureCases", pb.PurgeFailureCasesRequest())
        return int(reply.deleted), int(reply.history_deleted)

    def purge_history(self) -> int:
        """Delete the history drafter's past requests only; returns how many."""
        return int(self._unary("PurgeHistory", pb.PurgeHistoryRequest()).deleted)

    def health(self, timeout: float = 2.0) -> str:
        """ "SERVING", "NOT_SERVING", ... for the SpecLoRA service."""
        with self._errors():
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=timeout,
                metadata=self._metadata,
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

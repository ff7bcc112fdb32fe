"""SpecLoRAClient: the Python API to a running daemon. Never imports MLX.

    from speclora.client import SpecLoRAClient

    with SpecLoRAClient() as client:
        print(client.generate_text("Explain quantum computing simply."))
        for event in client.generate("Write a haiku", temperature=0.7):
            ...  # TextChunk ..., then one GenerationSummary

Errors are exceptions named for what the caller can do about them (DaemonNotRunning,
InvalidRequest, DaemonBusy, ...); gRPC status objects never leak out.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from speclora.shared.config import Config, load_config
from speclora.shared.paths import daemon_socket_path, resolve_paths
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

DEFAULT_CONNECT_TIMEOUT_S = 3.0
TOKEN_METADATA_KEY = "authorization"
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
    """A request field is out of range; `field` names it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.field = message.split(":", 1)[0] if ":" in message else ""


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
    finish_reason: str  # "eos" | "length" | "stop_string" | "cancelled"
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


@dataclass(frozen=True)
class AdapterInfo:
    version: str  # "" = the base draft
    active: bool
    parent: str
    acceptance_before: float
    acceptance_after: float
    status: str


GenerateEvent = TextChunk | GenerationSummary
TrainEvent = TrainStarted | TrainProgress | TrainEvaluation | TrainResult

_D = TypeVar("_D")


def _enum_name(value: int, enum: Any, prefix: str) -> str:
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
    )


_TRAIN_KINDS = {
    "started": TrainStarted,
    "progress": TrainProgress,
    "evaluation": TrainEvaluation,
    "result": TrainResult,
}


def _first(stream: Iterator[_D]) -> _D:
    try:
        return next(stream)
    except StopIteration:
        raise DaemonError("the daemon ended the stream without a reply") from None
    finally:
        stream.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- addresses


def default_address(config: Config) -> str:
    """The daemon's Unix socket as the daemon computes it (config, then the state dir)."""
    return f"unix:{daemon_socket_path(config.server.socket_path)}"


def _normalise(address: str) -> str:
    if address.startswith("unix:"):
        return address
    if address.startswith(("/", "./", "~")):
        return f"unix:{Path(address).expanduser().absolute()}"
    return address


def read_token() -> str | None:
    try:
        return resolve_paths().token_file.read_text().strip() or None
    except OSError:
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
        `token`, else the daemon's token file). None = the configured default socket."""
        config = load_config(config_path)
        self.address = _normalise(address) if address else default_address(config)
        self._tcp = not self.address.startswith("unix:")
        token = token or (read_token() if self._tcp else None)
        self._metadata = ((TOKEN_METADATA_KEY, f"Bearer {token}"),) if token else ()
        limit = max_message_bytes or config.server.max_message_bytes
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
            return InvalidRequest(details)
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
        timeout: float | None = None,
    ) -> Iterator[GenerateEvent]:
        """Stream a generation: TextChunks as they are accepted, then a GenerationSummary.

        messages: (role, content) pairs or {"role", "content"} dicts. Unset options take the
        daemon's configured defaults; draft_tokens None = adaptive, 0 = no speculation;
        use_history False = the model draft alone (no proposals from past requests)."""
        request = pb.GenerateRequest(prompt=prompt or "", raw=raw, stop=list(stop))
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
                    c.text, tuple(c.token_ids), tuple(c.from_draft), tuple(c.from_history)
                )
            else:
                yield _summary(event.summary)

    def generate_text(self, prompt: str | None = None, **options: Any) -> str:
        """The whole completion as one string (same options as generate)."""
        return "".join(e.text for e in self.generate(prompt, **options) if isinstance(e, TextChunk))

    def stats(self) -> StatsSnapshot:
        """One snapshot of the daemon's state."""
        return _first(self._stats(pb.StatsRequest()))

    def watch_stats(self, interval_s: float = 1.0) -> Iterator[StatsSnapshot]:
        """A snapshot every `interval_s` seconds until the caller stops iterating."""
        return self._stats(pb.StatsRequest(watch=True, interval_s=interval_s))

    def _stats(self, request: pb.StatsRequest) -> Iterator[StatsSnapshot]:
        with self._errors():
            call = self._stub.Stats(request, metadata=self._metadata)
        for snapshot in self._stream(call):
            yield _stats(snapshot)

    def train(
        self,
        *,
        steps: int | None = None,
        max_cases: int | None = None,
        learning_rate: float | None = None,
        force_promote: bool = False,
    ) -> Iterator[TrainEvent]:
        """Run a training session: TrainStarted, TrainEvaluation("before"), TrainProgress...,
        TrainEvaluation("after"), TrainResult."""
        request = pb.TrainRequest(force_promote=force_promote)
        for name, value in (
            ("steps", steps),
            ("max_cases", max_cases),
            ("learning_rate", learning_rate),
        ):
            if value is not None:
                setattr(request, name, value)
        with self._errors():
            call = self._stub.Train(request, metadata=self._metadata)
        for event in self._stream(call):
            kind = event.WhichOneof("event")
            yield _from_pb(_TRAIN_KINDS[kind], getattr(event, kind))

    def activate_adapter(
        self, version: str | None = None, *, rollback: bool = False
    ) -> AdapterInfo:
        """Make `version` the active adapter ("none" = base draft), or roll back."""
        request = pb.ActivateAdapterRequest(version=version or "", rollback=rollback)
        with self._errors():
            call = self._stub.ActivateAdapter(request, metadata=self._metadata)
        return _from_pb(AdapterInfo, _first(self._stream(call)))

    def health(self, timeout: float = 2.0) -> str:
        """ "SERVING", "NOT_SERVING", ... for the SpecLoRA service."""
        with self._errors():
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=timeout,
                metadata=self._metadata,
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

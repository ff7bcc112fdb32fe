"""Domain errors, and the one classification of them that every transport maps.

Each error carries an `ErrorKind`. The gRPC servicer turns a kind into a status code and the
HTTP API into an HTTP status, each in a table of its own; neither decides what an error *is*.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What kind of failure a domain error is (named after the gRPC codes they map to)."""

    INVALID_ARGUMENT = "invalid_argument"  # the client sent a bad field
    NOT_FOUND = "not_found"  # the client named something that does not exist
    FAILED_PRECONDITION = "failed_precondition"  # fine request, but the daemon's state forbids it
    RESOURCE_EXHAUSTED = "resource_exhausted"  # the engine queue is full; retry later
    UNAVAILABLE = "unavailable"  # loading or shutting down
    UNAUTHENTICATED = "unauthenticated"  # missing or wrong credentials
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the engine did not get to a call in time


class SpecLoRAError(Exception):
    """Base of every error we expect and explain to the user."""

    kind = ErrorKind.FAILED_PRECONDITION


class InvalidRequestError(SpecLoRAError):
    """A request field is bad. `field` names it as the client spelled it; the message too."""

    kind = ErrorKind.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def renamed(self, field: str) -> InvalidRequestError:
        """The same error under the name another transport's client used for the field."""
        return InvalidRequestError(field, self.detail)


class NotFoundError(SpecLoRAError):
    """The request names something the daemon does not have (e.g. a model)."""

    kind = ErrorKind.NOT_FOUND


class PreconditionError(SpecLoRAError):
    """The request is fine but the daemon's state forbids it now."""


class DeadlineError(SpecLoRAError):
    """The engine did not get to a call within its time (the caller's deadline, or ours)."""

    kind = ErrorKind.DEADLINE_EXCEEDED


class QueueFullError(SpecLoRAError):
    """The engine queue is at its bound."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class ShuttingDownError(SpecLoRAError):
    """The daemon is draining (or not serving yet)."""

    kind = ErrorKind.UNAVAILABLE


class UnauthenticatedError(SpecLoRAError):
    """A call without the credentials the daemon requires."""

    kind = ErrorKind.UNAUTHENTICATED


class ModelError(SpecLoRAError):
    """A model cannot be found, converted or loaded, or the pair does not fit together."""


class AdapterError(SpecLoRAError):
    """An adapter is missing, corrupt or does not fit the draft."""


class AdapterNotFoundError(AdapterError, NotFoundError):
    """No adapter version of that name."""

    kind = ErrorKind.NOT_FOUND


class StoreUnavailableError(PreconditionError):
    """The failure database cannot be opened, read or written. The message names the file and
    what to do about it; serving goes on without it."""


def error_kind(exc: BaseException) -> ErrorKind | None:
    """The kind of an expected error; None for anything else (a bug: INTERNAL / 500)."""
    return exc.kind if isinstance(exc, SpecLoRAError) else None

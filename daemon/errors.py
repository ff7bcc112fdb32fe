"""Domain errors. The servicer maps each to one gRPC status code, in one place."""

from __future__ import annotations


class SpecLoRAError(Exception):
    """Base of every error we expect and explain to the user."""


class InvalidRequestError(SpecLoRAError):
    """A request field is bad -> INVALID_ARGUMENT. The message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotFoundError(SpecLoRAError):
    """The request names something that does not exist (an adapter version, a case) -> NOT_FOUND."""


class DeadlineError(SpecLoRAError):
    """The engine did not get to a call within its time -> DEADLINE_EXCEEDED."""


class PreconditionError(SpecLoRAError):
    """The request is fine but the daemon's state forbids it now -> FAILED_PRECONDITION."""


class QueueFullError(SpecLoRAError):
    """The engine queue is at its bound -> RESOURCE_EXHAUSTED."""


class ShuttingDownError(SpecLoRAError):
    """The daemon is draining -> UNAVAILABLE."""


class ModelError(SpecLoRAError):
    """A model cannot be found, converted or loaded, or the pair does not fit together."""


class AdapterError(SpecLoRAError):
    """An adapter is missing, corrupt or does not fit the draft."""


class AdapterNotFoundError(AdapterError, NotFoundError):
    """No adapter version of that name -> NOT_FOUND."""


class StoreUnavailableError(PreconditionError):
    """The failure database cannot be opened, read or written -> FAILED_PRECONDITION. The message
    names the file and what to do about it; serving goes on without it."""

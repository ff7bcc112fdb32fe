"""The client side: click CLI and the Python stub. Never imports MLX.

from speclora.client import SpecLoRAClient, TextChunk, GenerationSummary
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from speclora.client.stub import (
        AdapterInfo,
        AdapterList,
        DaemonBusy,
        DaemonError,
        DaemonNotRunning,
        DaemonShuttingDown,
        DeadlineExceeded,
        FailureCase,
        FailureCaseList,
        FailureStats,
        GenerationSummary,
        InvalidRequest,
        NotFound,
        PreconditionFailed,
        SpecLoRAClient,
        SpecLoRAClientError,
        StatsSnapshot,
        TextChunk,
        TrainEvaluation,
        TrainProgress,
        TrainResult,
        TrainStarted,
        Unauthenticated,
    )

__all__ = [
    "AdapterInfo",
    "AdapterList",
    "DaemonBusy",
    "DaemonError",
    "DaemonNotRunning",
    "DaemonShuttingDown",
    "DeadlineExceeded",
    "FailureCase",
    "FailureCaseList",
    "FailureStats",
    "GenerationSummary",
    "InvalidRequest",
    "NotFound",
    "PreconditionFailed",
    "SpecLoRAClient",
    "SpecLoRAClientError",
    "StatsSnapshot",
    "TextChunk",
    "TrainEvaluation",
    "TrainProgress",
    "TrainResult",
    "TrainStarted",
    "Unauthenticated",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `import speclora.client` stays cheap and grpc loads only when the stub is used.
    if name in __all__:
        from speclora.client import stub

        return getattr(stub, name)
    raise AttributeError(f"module 'speclora.client' has no attribute {name!r}")

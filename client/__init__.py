"""The client side: click CLI and the Python stub. Never imports MLX.

from speclora.client import SpecLoRAClient, TextChunk, GenerationSummary
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from speclora.client.stub import (
        AdapterInfo,
        DaemonBusy,
        DaemonNotRunning,
        GenerationSummary,
        InvalidRequest,
        SpecLoRAClient,
        SpecLoRAClientError,
        StatsSnapshot,
        TextChunk,
        TrainEvaluation,
        TrainProgress,
        TrainResult,
        TrainStarted,
    )

__all__ = [
    "AdapterInfo",
    "DaemonBusy",
    "DaemonNotRunning",
    "GenerationSummary",
    "InvalidRequest",
    "SpecLoRAClient",
    "SpecLoRAClientError",
    "StatsSnapshot",
    "TextChunk",
    "TrainEvaluation",
    "TrainProgress",
    "TrainResult",
    "TrainStarted",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `import speclora.client` stays cheap and grpc loads only when the stub is used.
    if name in __all__:
        from speclora.client import stub

        return getattr(stub, name)
    raise AttributeError(f"module 'speclora.client' has no attribute {name!r}")

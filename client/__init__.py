"""The client side: click CLI and the Python stub. Never imports MLX.

from speclora.client import SpecLoRAClient
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from speclora.client.stub import SpecLoRAClient

__all__ = ["SpecLoRAClient"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import speclora.client` stays cheap and works before grpc is needed.
    if name == "SpecLoRAClient":
        from speclora.client.stub import SpecLoRAClient

        return SpecLoRAClient
    raise AttributeError(name)

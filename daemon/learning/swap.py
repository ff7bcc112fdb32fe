"""Move adapters between their files and the live draft: save, hot-swap, remove, start-up.

Everything here runs on the engine worker thread (it mutates `hub.draft`). A swap checks the
whole adapter against a throwaway clone of the draft first, so a bad adapter raises
AdapterError and leaves the serving draft exactly as it was. LoRA is applied unfused, so a
self-draft keeps sharing the target's weight arrays; a running stream simply continues with
the new draft weights at its next step (output stays the target's, only acceptance changes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import structlog
from speclora.daemon.errors import AdapterError
from speclora.daemon.learning import lora
from speclora.daemon.learning.adapters import (
    CONFIG_FILE,
    EXTRAS_FILE,
    NONE_VERSIONS,
    PROMOTED,
    WEIGHTS_FILE,
    AdapterInfo,
    AdapterStore,
)
from speclora.daemon.models import unique_weight_bytes
from speclora.daemon.state import ModelHub

log = structlog.get_logger(__name__)

# hub.extras key: the self-draft's own final-norm arrays before any adapter touched them.
BASE_NORM_KEY = "learning.base_draft_norm"
# hub.extras key: how many times the draft's adapter changed. A training run compares it at its
# end with its start, so it never overwrites an activation or rollback made while it trained.
SWAPS_KEY = "learning.adapter_swaps"


def swap_count(hub: ModelHub) -> int:
    """Adapter changes so far (apply or remove); worker thread only."""
    return int(hub.extras.get(SWAPS_KEY, 0))


def _recount_weights(hub: ModelHub) -> None:
    """An adapter's LoRA layers (and a self-draft's own norm) are weights the pair now holds."""
    modules = [hub.target] + ([hub.draft] if hub.draft is not None else [])
    hub.weight_bytes = unique_weight_bytes(*modules)


def _count_swap(hub: ModelHub) -> None:
    hub.extras[SWAPS_KEY] = swap_count(hub) + 1


def is_self_draft(hub: ModelHub) -> bool:
    return hub.draft_spec.startswith("self:")


def save_adapter(
    adapters: AdapterStore,
    model: nn.Module,
    config: dict[str, Any],
    metadata: dict[str, Any],
    *,
    with_norm: bool,
) -> AdapterInfo:
    """Write `model`'s LoRA weights (and a self-draft's norm) as a new version, atomically."""
    weights, extras = lora.split_weights(model, with_norm=with_norm)
    mx.eval(weights, extras)

    def write(tmp: Path) -> None:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        if extras:
            mx.save_safetensors(str(tmp / EXTRAS_FILE), extras, metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    return adapters.create(write, metadata)


def _read_adapter(
    adapters: AdapterStore, version: str
) -> tuple[AdapterInfo, dict[str, Any], dict[str, mx.array], dict[str, mx.array]]:
    info = adapters.verify(version)
    path = adapters.path(version)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        lora_params = config["lora_parameters"]
        config = lora.adapter_config(
            config["num_layers"], lora_params["rank"], lora_params["scale"], lora_params["dropout"]
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {version}: {CONFIG_FILE} is invalid: {exc}") from None
    try:
        weights = mx.load(str(path / WEIGHTS_FILE))
        extras = mx.load(str(path / EXTRAS_FILE)) if (path / EXTRAS_FILE).exists() else {}
    except Exception as exc:  # mx.load raises plain RuntimeError/ValueError on damage
        raise AdapterError(f"adapter {version}: cannot read weights: {exc}") from None
    # A diverged run or a damaged file can hold NaN/inf with valid checksums: such a draft
    # would reject every proposal, so refuse it like any other corrupt adapter.
    for name, array in [*weights.items(), *extras.items()]:  # type: ignore[union-attr]
        if not mx.all(mx.isfinite(array)).item():
            raise AdapterError(
                f"adapter {version}: {name} holds values that are not finite (NaN or inf)"
            )
    return info, config, weights, extras  # type: ignore[return-value]


def apply_adapter(hub: ModelHub, adapters: AdapterStore, version: str) -> AdapterInfo | None:
    """Hot-swap `version` into `hub.draft` ("none" or "" removes adapters). Worker thread only.

    Raises AdapterError (hub untouched) when the adapter is missing, corrupt or does not fit.
    """
    if version in NONE_VERSIONS:
        remove_adapter(hub)
        return None
    if hub.draft is None:
        raise AdapterError("there is no draft model to apply an adapter to")
    info, config, weights, extras = _read_adapter(adapters, version)
    trained_for = info.metadata.get("draft_id")
    if trained_for and hub.draft_name and trained_for != hub.draft_name:
        raise AdapterError(
            f"adapter {version} was trained for draft {trained_for!r}, but the daemon's draft "
            f"is {hub.draft_name!r}"
        )
    self_draft = is_self_draft(hub)
    if extras and not self_draft:
        raise AdapterError(f"adapter {version} carries self-draft weights; this draft is not one")
    if self_draft:
        lora.own_final_norm(hub.draft, hub.target)
        base_norm = hub.extras.setdefault(BASE_NORM_KEY, lora.norm_weights(hub.draft))
        extras = extras or base_norm  # an adapter without a norm runs on the base norm
    try:
        lora.check_weights(hub.draft, config, weights, extras)
    except AdapterError as exc:  # say which adapter: the message reaches the RPC and the log
        raise AdapterError(f"adapter {version}: {exc}") from None
    lora.load(hub.draft, config, weights, extras)
    _count_swap(hub)
    _recount_weights(hub)
    previous = hub.adapter_version
    hub.adapter_version = version
    log.info("adapter_applied", version=version, previous=previous or "none")
    return info


def remove_adapter(hub: ModelHub) -> None:
    """Back to the base draft: LoRA layers off, a self-draft's norm restored."""
    _count_swap(hub)
    if hub.draft is None:
        hub.adapter_version = ""
        return
    lora.strip(hub.draft)
    base_norm = hub.extras.get(BASE_NORM_KEY)
    if base_norm:
        hub.draft.load_weights(list(base_norm.items()), strict=False)
    _recount_weights(hub)
    previous = hub.adapter_version
    hub.adapter_version = ""
    if previous:
        log.info("adapter_removed", previous=previous)


def load_active_adapter(hub: ModelHub, adapters: AdapterStore) -> str:
    """At daemon start: apply the active adapter, falling back to earlier good ones.

    A corrupt or unfitting version is logged and skipped; the pointer is rewritten to what was
    actually loaded ("" = base draft), so the CLI shows the truth.
    """
    adapters.remove_leftovers()
    candidates = adapters.fallback_candidates()
    for version in candidates:
        try:
            apply_adapter(hub, adapters, version)
        except AdapterError as exc:
            log.error("adapter_refused", version=version, error=str(exc))
            continue
        adapters.settle_active(version)
        return version
    if candidates:
        log.warning("adapter_fallback_to_base", tried=candidates)
        adapters.settle_active("")
    remove_adapter(hub)
    return ""


def activate_version(
    hub: ModelHub,
    adapters: AdapterStore,
    version: str = "",
    *,
    rollback: bool = False,
    force: bool = False,
) -> AdapterInfo | None:
    """ActivateAdapter and RollbackAdapter: swap the draft first, then move the pointer.

    The draft changes only when the adapter loads, and the pointer only after the draft did,
    so a refused adapter (AdapterError) changes neither. Returns None for the base draft.
    The promotion gate holds here, in the daemon: a version it rejected needs `force`.
    Rolling back returns to what was active before, whatever the gate said of it then.
    """
    if rollback:
        pointer = adapters.pointer()
        if not pointer["version"] and not pointer["history"]:
            raise AdapterError("nothing to roll back: no adapter is active and there is no history")
        previous = pointer["history"][-1] if pointer["history"] else ""
        apply_adapter(hub, adapters, previous)
        adapters.rollback()
        return adapters.get(previous) if previous else None
    if version not in NONE_VERSIONS:
        info = adapters.verify(version)
        if info.status != PROMOTED and not force:
            raise AdapterError(
                f"adapter {version} was {info.status or 'not promoted'} by the promotion gate "
                f"({info.reason}); activate it with force (`speclora adapters activate "
                f"{version} --force`) to use it anyway"
            )
    info = apply_adapter(hub, adapters, version)
    adapters.activate(version, force=True)  # the gate was checked above
    return adapters.get(info.version) if info else None

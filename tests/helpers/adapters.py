"""Real adapter versions for tests: random, non-zero LoRA weights for a hub's draft."""

from __future__ import annotations

import mlx.core as mx
from speclora.daemon.learning import lora
from speclora.daemon.learning.adapters import PROMOTED, AdapterStore
from speclora.daemon.learning.swap import save_adapter
from speclora.daemon.state import ModelHub


def make_adapter(
    store: AdapterStore,
    hub: ModelHub,
    seed: int,
    status: str = PROMOTED,
    parent: str = "",
    created_at: float | None = None,
) -> str:
    """A version with random, non-zero LoRA weights (and norm, for a self-draft). MLX: call it
    on the worker thread when a daemon owns `hub`."""
    model = lora.clone_tree(hub.draft)
    config = lora.adapter_config(len(model.layers), 4, 10.0, 0.0)
    mx.random.seed(seed)
    lora.attach(model, config)
    lora_w, extras = lora.split_weights(model, with_norm=hub.draft_spec.startswith("self:"))
    updates = [(k, mx.random.normal(v.shape) * 0.05) for k, v in lora_w.items()]
    updates += [(k, v * 1.5) for k, v in extras.items()]
    model.load_weights(updates, strict=False)
    meta = {"status": status, "parent": parent, "reason": "test", "draft_id": hub.draft_name}
    if created_at is not None:
        meta["created_at"] = created_at
    info = save_adapter(store, model, config, meta, with_norm=hub.draft_spec.startswith("self:"))
    return info.version

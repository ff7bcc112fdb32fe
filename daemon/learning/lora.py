"""LoRA surgery on a draft model: attach, choose what trains, export and load weights.

Works on any mlx-lm-style model with a `layers` list, which covers both a separate mlx-lm draft
and a self-draft (`self:N`, a separate module tree whose arrays are the target's). LoRA stays
unfused: fusing would write new base weights, and a self-draft's base weights *are* the
target's. A self-draft also trains its own copy of the final norm; that tensor is kept apart
from the LoRA file so `adapters.safetensors` still loads with `mlx_lm.generate --adapter-path`.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from speclora.daemon.errors import AdapterError

LORA_LEAVES = ("lora_a", "lora_b")
_NORM_TYPES = (nn.RMSNorm, nn.LayerNorm)
_FINAL_NORM_NAMES = ("norm", "final_norm", "final_layernorm", "ln_f", "norm_f")


def clone_tree(value: Any) -> Any:
    """A new module tree with the same arrays: no weight is copied (MLX arrays are values).

    Training mutates the clone (LoRA layers, optimizer updates) while generation keeps using
    the original, so the daemon serves unchanged until an adapter is promoted.
    """
    if isinstance(value, nn.Module):
        new = copy.copy(value)
        # Per-module bookkeeping (_no_grad, _training) must not be shared with the original.
        object.__setattr__(
            new,
            "__dict__",
            {
                k: copy.copy(v) if isinstance(v, (set, dict, list)) else v
                for k, v in value.__dict__.items()
            },
        )
        for key, child in value.items():
            dict.__setitem__(new, key, clone_tree(child))
        return new
    if isinstance(value, list):
        return [clone_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(clone_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    return value


def adapter_config(num_layers: int, rank: int, scale: float, dropout: float) -> dict[str, Any]:
    """The adapter_config.json mlx-lm's `load_adapters` reads."""
    return {
        "fine_tune_type": "lora",
        "num_layers": int(num_layers),
        "lora_parameters": {"rank": int(rank), "scale": float(scale), "dropout": float(dropout)},
    }


def resolve_num_layers(model: nn.Module, configured: int) -> int:
    """lora.layers = -1 means every draft layer; never more than the draft has."""
    total = len(model.layers)
    return total if configured < 0 else min(configured, total)


def current_config(model: nn.Module) -> dict[str, Any] | None:
    """The adapter config of the LoRA layers attached now, or None when there are none."""
    layers_with_lora = 0
    first: LoRALinear | None = None
    for layer in model.layers:
        found = [m for _, m in layer.named_modules() if isinstance(m, LoRALinear)]
        if found:
            layers_with_lora += 1
            first = first or found[0]
    if first is None:
        return None
    return adapter_config(
        layers_with_lora, first.lora_a.shape[1], first.scale, round(1.0 - first.dropout._p_1, 6)
    )


def attach(model: nn.Module, config: dict[str, Any], seed: int | None = None) -> bool:
    """Wrap the last `num_layers` layers' linears with LoRA; False if already so (weights kept).

    Fresh LoRA starts as the identity (lora_b = 0). With `seed`, lora_a is drawn from its own
    key instead of MLX's global random state, which generation in the same thread uses.
    """
    if current_config(model) == config:
        return False
    strip(model)
    _to_lora_layers(model, config["num_layers"], dict(config["lora_parameters"]))
    if seed is not None:
        key = mx.random.key(seed)
        for _, module in model.named_modules():
            if isinstance(module, LoRALinear):
                key, sub = mx.random.split(key)
                bound = 1.0 / module.lora_a.shape[0] ** 0.5
                module.lora_a = mx.random.uniform(-bound, bound, module.lora_a.shape, key=sub)
    return True


def _to_lora_layers(model: nn.Module, num_layers: int, params: dict[str, Any]) -> None:
    """Wrap every linear of the last `num_layers` layers with LoRA, as mlx-lm's
    `linear_to_lora_layers` does for a model whose layers hold only plain or quantized linears.
    Its module (mlx_lm.tuner.utils) imports mlx_lm.utils and with it transformers, so it is
    used only for layers it alone handles (mixture-of-experts, embeddings, custom `to_lora`)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    linears = (nn.Linear, nn.QuantizedLinear)
    others = (nn.Embedding, nn.QuantizedEmbedding, SwitchLinear, QuantizedSwitchLinear)
    modules = [m for layer in model.layers for _, m in layer.named_modules()]
    if any(hasattr(m, "to_lora") or isinstance(m, others) for m in modules):
        from mlx_lm.tuner.utils import linear_to_lora_layers

        linear_to_lora_layers(model, num_layers, params)
        return
    for layer in model.layers[-max(num_layers, 0) :]:
        wrapped = [
            (
                name,
                LoRALinear.from_base(
                    m, r=params["rank"], scale=params["scale"], dropout=params["dropout"]
                ),
            )  # fmt: skip
            for name, m in layer.named_modules()
            if isinstance(m, linears)
        ]
        if wrapped:
            layer.update_modules(tree_unflatten(wrapped))


def strip(model: nn.Module) -> None:
    """Remove LoRA wrappers, leaving the base linears (shared arrays untouched)."""
    unwrapped = [(name, m.linear) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if unwrapped:
        model.update_modules(tree_unflatten(unwrapped))


def final_norm_path(model: nn.Module) -> str | None:
    """Dotted path of the norm after the last layer (e.g. "model.norm"), if there is one."""
    candidates = [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, _NORM_TYPES) and "layers" not in name.split(".")
    ]
    named = [c for c in candidates if c.rsplit(".", 1)[-1] in _FINAL_NORM_NAMES]
    if named:
        return named[0]
    return candidates[0] if len(candidates) == 1 else None


def _module_at(model: nn.Module, path: str) -> nn.Module:
    module: Any = model
    for part in path.split("."):
        module = module[part] if isinstance(module, dict) else module[int(part)]
    return module


def own_final_norm(draft: nn.Module, target: nn.Module | None) -> str | None:
    """Make sure the draft's final norm is not the target's module object.

    A self-draft shares arrays with the target; training or loading its norm must replace
    the draft's own module entry, never the target's. Returns the norm's path.
    """
    path = final_norm_path(draft)
    if path is None or target is None:
        return path
    norm = _module_at(draft, path)
    if any(m is norm for _, m in target.named_modules()):
        draft.update_modules(tree_unflatten([(path, clone_tree(norm))]))
    return path


def set_trainable(model: nn.Module, *, train_norm: bool) -> list[str]:
    """Freeze everything but the LoRA matrices (and the final norm); returns trainable names."""
    model.freeze()

    def unfreeze_lora(_: str, m: nn.Module) -> None:
        if isinstance(m, LoRALinear):
            m.unfreeze(keys=list(LORA_LEAVES), recurse=False)

    model.apply_to_modules(unfreeze_lora)
    if train_norm and (path := final_norm_path(model)) is not None:
        _module_at(model, path).unfreeze()
    return [name for name, _ in tree_flatten(model.trainable_parameters())]


def split_weights(
    model: nn.Module, *, with_norm: bool
) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """(LoRA weights, extras) as flat name -> array dicts, ready for safetensors."""
    params = dict(tree_flatten(model.parameters()))
    lora = {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] in LORA_LEAVES}
    extras: dict[str, mx.array] = {}
    if with_norm and (path := final_norm_path(model)) is not None:
        extras = {k: v for k, v in params.items() if k.startswith(path + ".")}
    return lora, extras


def norm_weights(model: nn.Module) -> dict[str, mx.array]:
    """The final norm's current arrays (to restore a self-draft's base norm later)."""
    path = final_norm_path(model)
    if path is None:
        return {}
    params = dict(tree_flatten(model.parameters()))
    return {k: v for k, v in params.items() if k.startswith(path + ".")}


def check_weights(
    model: nn.Module,
    config: dict[str, Any],
    lora: dict[str, mx.array],
    extras: dict[str, mx.array],
) -> None:
    """Raise AdapterError unless the weights fit the model exactly, without touching it."""
    probe = clone_tree(model)
    attach(probe, config)
    params = dict(tree_flatten(probe.parameters()))
    expected = {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] in LORA_LEAVES}
    norm = norm_weights(probe)
    errors = [f"{k}: missing" for k in expected if k not in lora]
    for name, w in [*lora.items(), *extras.items()]:
        allowed = expected if name in lora else norm
        if name not in allowed:
            errors.append(f"{name}: not a parameter of this draft")
        elif tuple(w.shape) != tuple(allowed[name].shape):
            errors.append(
                f"{name}: shape {tuple(w.shape)} does not match the draft's "
                f"{tuple(allowed[name].shape)}"
            )
    if errors:
        shown = "\n  ".join(errors[:8]) + ("\n  ..." if len(errors) > 8 else "")
        raise AdapterError(f"adapter does not fit this draft:\n  {shown}")


def load(
    model: nn.Module,
    config: dict[str, Any],
    lora: dict[str, mx.array],
    extras: dict[str, mx.array],
) -> None:
    """Attach LoRA per `config` and load the weights in place (call check_weights first)."""
    attach(model, config)
    model.load_weights([*lora.items(), *extras.items()], strict=False)
    mx.eval(model.parameters())

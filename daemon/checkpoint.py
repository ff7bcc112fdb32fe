"""Build an mlx-lm model from a checkpoint directory without importing `mlx_lm.utils`.

`mlx_lm.utils` imports transformers and huggingface_hub at its top, ~26 MiB that would stay in
the daemon for its lifetime (see mlx_lm_imports.py). This runs the steps of its `load_model`
that plain and mlx-quantized checkpoints take, in its order: the config (non-finite floats
untagged, generation_config's EOS ids), the safetensors, the architecture module
(`mlx_lm.models.<model_type>`, renamed by mlx-lm's own remapping tables, read from its source),
`sanitize`, per-layer quantization, `load_weights`. A checkpoint that needs anything else (a
custom model file, a foreign `quantization_config`, quantized activations, tables this cannot
read) gets None from `load_checkpoint`, and the caller loads it with mlx-lm's loader.
tests/test_checkpoint.py checks that both loaders build the same model.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

# transformers writes non-finite floats in config.json as {"__float__": "Infinity"}.
_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _untag_floats(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[value["__float__"]]
        return {k: _untag_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    return value


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json, with generation_config.json's eos_token_id over its own (as mlx-lm)."""
    with open(model_dir / "config.json", encoding="utf-8") as f:
        config: dict[str, Any] = _untag_floats(json.load(f))
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        try:
            with open(generation, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
        except ValueError:
            eos = None
        if eos:
            config["eos_token_id"] = eos
    return config


@functools.cache
def _remapping_tables() -> tuple[dict[str, str], dict[tuple[str, str], str]] | None:
    """mlx-lm's MODEL_REMAPPING and MODEL_ARCHITECTURE_REMAPPING, read from mlx_lm/utils.py's
    source (importing it is what this module avoids); None if they are not plain literals."""
    spec = importlib.util.find_spec("mlx_lm.utils")
    if spec is None or spec.origin is None:
        return None
    tables: dict[str, Any] = {}
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name) and target.id in (
                    "MODEL_REMAPPING",
                    "MODEL_ARCHITECTURE_REMAPPING",
                ):
                    tables[target.id] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        return None
    if set(tables) != {"MODEL_REMAPPING", "MODEL_ARCHITECTURE_REMAPPING"}:
        return None
    return tables["MODEL_REMAPPING"], tables["MODEL_ARCHITECTURE_REMAPPING"]


def architecture_module(config: dict[str, Any]) -> str | None:
    """The mlx_lm.models module that builds this config's model, as mlx-lm picks it."""
    tables = _remapping_tables()
    if tables is None or "model_type" not in config:
        return None
    by_type, by_architecture = tables
    model_type = config["model_type"]
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    for architecture in architectures:
        if (model_type, architecture) in by_architecture:
            return by_architecture[(model_type, architecture)]
    return by_type.get(model_type, model_type)


def _quantization_params(path: str, module: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """group_size, bits and mode a saved layer was packed with (mlx-lm's infer_quant_config)."""
    import mlx.core as mx

    scales = weights[f"{path}.scales"]
    in_dims = module.weight.shape[-1]
    group_size = in_dims // scales.shape[-1]
    bits = (weights[f"{path}.weight"].shape[-1] * 32) // in_dims
    if scales.dtype != mx.uint8:  # only affine keeps its scales in the weights' dtype
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    modes = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
    if (bits, group_size) not in modes:
        raise ValueError(
            f"cannot tell how {path} was quantized ({bits} bits, groups of {group_size})"
        )
    return {"group_size": group_size, "bits": bits, "mode": modes[(bits, group_size)]}


def load_checkpoint(model_dir: Path) -> tuple[Any, dict[str, Any]] | None:
    """The (lazy) model and its config, or None where mlx-lm's loader must do it (above)."""
    import glob

    import mlx.core as mx
    import mlx.nn as nn

    config = read_config(model_dir)
    if "model_file" in config or config.get("quantize_activations", False):
        return None
    foreign_quantization = (
        "quantization_config" in config
        or "quantization_config" in config.get("text_config", {})
        or (model_dir / "hf_quant_config.json").exists()
    )
    if "quantization" not in config and foreign_quantization:
        return None  # mlx-lm writes both keys; only its own "quantization" is read here
    name = architecture_module(config)
    if name is None:
        return None
    try:
        arch = importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        return None  # mlx-lm's loader names the unsupported type in its error
    files = glob.glob(str(model_dir / "model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors found in {model_dir}")
    weights: dict[str, Any] = {}
    for file in files:
        weights.update(mx.load(file))
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if (quantization := config.get("quantization")) is not None:
        if any(k.endswith(".global_scale") for k in weights):
            return None  # nvfp4 tensor scales: mlx-lm's loader knows which layers take them

        def predicate(path: str, module: Any) -> Any:
            if path in quantization:  # a per-layer setting
                return quantization[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
                return False
            return _quantization_params(path, module, weights)

        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=predicate,
        )
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    return model, config


def dequantize(model: Any) -> Any:
    """The model with its quantized linears and embeddings made plain (mlx-lm's
    dequantize_model, which lives in mlx_lm.utils)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    plain = []
    for name, module in model.named_modules():
        bias = "bias" in module
        if isinstance(module, nn.QuantizedLinear):
            cls, kwargs = nn.Linear, {"bias": bias}
        elif isinstance(module, nn.QuantizedEmbedding):
            cls, kwargs = nn.Embedding, {}
        elif isinstance(module, QuantizedSwitchLinear):
            cls, kwargs = SwitchLinear, {"bias": bias}
        else:
            continue
        weight = mx.dequantize(
            module.weight,
            module.scales,
            module.biases,
            module.group_size,
            module.bits,
            module.mode,
        )
        layer = cls(*weight.shape[::-1], **kwargs)
        if bias:
            layer.bias = module.bias
        layer.weight = weight
        plain.append((name, layer))
    if plain:
        model.update_modules(tree_unflatten(plain))
    return model


def count_parameters(model: Any) -> int:
    """Parameters as trained: a quantized layer counts its unpacked weights (mlx-lm's
    get_total_parameters)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    total = 0
    for _, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if hasattr(module, "bits"):
            total += (module.bias.size if "bias" in module else 0) + (
                module.weight.size * 32 // module.bits
            )
        else:
            total += sum(v.size for _, v in tree_flatten(module.parameters()))
    return int(total)

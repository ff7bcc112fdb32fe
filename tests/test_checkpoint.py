"""daemon/checkpoint.py builds the model mlx-lm's own loader builds, without mlx_lm.utils."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from speclora.daemon import checkpoint


def parameters(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assert_same_model(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = parameters(ours), parameters(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert mx.array_equal(a[name], b[name]).item(), name
    assert [type(m).__name__ for _, m in ours.named_modules()] == [
        type(m).__name__ for _, m in theirs.named_modules()
    ]
    tokens = mx.array([[1, 5, 9, 2, 7]])
    assert mx.array_equal(ours(tokens), theirs(tokens)).item()


@pytest.fixture(scope="module")
def quantized_path(tiny_target_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny target, 4-bit affine with groups of 32, except its embedding at 8 bits: a
    per-layer setting in config.json as mlx-lm writes it."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    out = tmp_path_factory.mktemp("quantized")
    model, config = load_model(tiny_target_path)

    def predicate(path: str, module: nn.Module):
        if path.endswith("embed_tokens"):
            return {"group_size": 32, "bits": 8}
        return hasattr(module, "to_quantized")

    model, config = quantize_model(model, config, 32, 4, quant_predicate=predicate)
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_target_path / name, out / name)
    return out


def both_loaders(path: Path) -> tuple[nn.Module, nn.Module]:
    """(ours, mlx-lm's) models of the checkpoint in `path`, their configs checked equal."""
    from mlx_lm.utils import load_model

    loaded = checkpoint.load_checkpoint(path)
    assert loaded is not None
    model, config = loaded
    theirs, their_config = load_model(path)
    assert config == their_config
    return model, theirs


def test_a_plain_checkpoint_loads_as_with_mlx_lm(tiny_target_path: Path) -> None:
    from mlx_lm.utils import get_total_parameters

    model, theirs = both_loaders(tiny_target_path)
    assert_same_model(model, theirs)
    assert checkpoint.count_parameters(model) == get_total_parameters(theirs)


def test_a_quantized_checkpoint_loads_as_with_mlx_lm(quantized_path: Path) -> None:
    from mlx_lm.utils import dequantize_model, get_total_parameters

    model, theirs = both_loaders(quantized_path)
    assert_same_model(model, theirs)
    assert model.model.embed_tokens.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 4
    assert checkpoint.count_parameters(model) == get_total_parameters(theirs)
    assert_same_model(checkpoint.dequantize(model), dequantize_model(theirs))


def test_the_remapping_tables_are_mlx_lm_s(tiny_target_path: Path) -> None:
    from mlx_lm import utils

    tables = checkpoint._remapping_tables()
    assert tables == (utils.MODEL_REMAPPING, utils.MODEL_ARCHITECTURE_REMAPPING)
    assert checkpoint.architecture_module({"model_type": "mistral"}) == "llama"
    assert checkpoint.architecture_module({"model_type": "llama"}) == "llama"


def write_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_what_it_does_not_handle_goes_to_mlx_lm(tiny_target_path: Path, tmp_path: Path) -> None:
    foreign = write_config(
        tiny_target_path, tmp_path / "awq", quantization_config={"quant_method": "awq"}
    )
    assert checkpoint.load_checkpoint(foreign) is None
    custom = write_config(tiny_target_path, tmp_path / "custom", model_file="model.py")
    assert checkpoint.load_checkpoint(custom) is None
    unknown = write_config(tiny_target_path, tmp_path / "unknown", model_type="no_such_model")
    assert checkpoint.load_checkpoint(unknown) is None


def test_non_finite_floats_and_generation_eos_are_read(tiny_target_path: Path, tmp_path: Path):
    from mlx_lm.utils import load_config

    path = write_config(
        tiny_target_path, tmp_path / "m", rope_scaling_limit={"__float__": "Infinity"}
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    config = checkpoint.read_config(path)
    assert config["rope_scaling_limit"] == float("inf")
    assert config["eos_token_id"] == [3, 4]
    assert config == load_config(path)


def test_lora_wraps_the_layers_mlx_lm_would(tiny_target_path: Path) -> None:
    """learning/lora.py's own LoRA surgery (mlx-lm's lives beside an import of transformers)
    wraps the same linears, with the same settings, and strips back to the same model."""
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    from speclora.daemon.learning import lora

    ours, _ = load_model(tiny_target_path)
    theirs, _ = load_model(tiny_target_path)
    config = lora.adapter_config(num_layers=3, rank=4, scale=8.0, dropout=0.0)
    lora.attach(ours, config)
    linear_to_lora_layers(theirs, 3, dict(config["lora_parameters"]))

    def wrapped(model: nn.Module) -> dict[str, tuple]:
        return {
            name: (m.lora_a.shape, m.scale, type(m.linear).__name__)
            for name, m in model.named_modules()
            if isinstance(m, LoRALinear)
        }

    assert wrapped(ours) == wrapped(theirs) != {}
    assert lora.current_config(ours) == config
    lora.strip(ours)
    assert wrapped(ours) == {}
    plain, _ = load_model(tiny_target_path)
    assert_same_model(ours, plain)


def test_mlx_lm_submodules_import_without_its_init_and_its_names_still_resolve() -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        import speclora.daemon  # installs the lazy packages
        import mlx_lm.models.cache, mlx_lm.models.llama, mlx_lm.tuner.lora
        before = "transformers" in sys.modules
        from mlx_lm import load, stream_generate
        from mlx_lm.tuner import linear_to_lora_layers
        import mlx_lm
        print(before, callable(load), callable(linear_to_lora_layers), bool(mlx_lm.__version__))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True", "True", "True"]

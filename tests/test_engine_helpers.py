"""Tiny models and statistics helpers for the engine tests.

The shared tiny models have an untied random head, so the next token is a varied function of
the context: a random draft really disagrees with the target, a shallow self-draft agrees
sometimes, and greedy equality tests mean something.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from speclora.daemon.tiny import TinyModelSpec, write_tiny_model


def write_untied_model(path: Path, spec: TinyModelSpec, head_scale: float = 1.0) -> Path:
    """A tiny model whose (untied) output head is scaled: < 1 flattens its distributions."""
    import mlx.core as mx

    write_tiny_model(path, spec)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    if head_scale != 1.0:
        weights = mx.load(str(path / "model.safetensors"))
        weights["lm_head.weight"] = head_scale * weights["lm_head.weight"]
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def write_untied_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    target = write_untied_model(root / "target", TinyModelSpec(num_layers=4, seed=seed))
    draft = write_untied_model(root / "draft", TinyModelSpec(num_layers=2, seed=seed + 1000))
    return target, draft


def self_draft(target: Any, num_layers: int) -> Any:
    """The target's first layers, final norm and head, sharing its arrays (like 'self:N')."""
    from mlx.utils import tree_flatten

    args = type(target.args).from_dict({**vars(target.args), "num_hidden_layers": num_layers})
    args.layer_types = args.layer_types[:num_layers]
    draft = type(target)(args)
    quantized = getattr(target, "lm_head", None)
    if hasattr(quantized, "scales"):  # quantize the same way so the packed arrays fit
        import mlx.nn as nn

        nn.quantize(draft, group_size=quantized.group_size, bits=quantized.bits)
    params = dict(tree_flatten(target.parameters()))
    draft.load_weights([(k, params[k]) for k, _ in tree_flatten(draft.parameters())])
    draft.eval()
    return draft


def unshared_copy(draft: Any) -> Any:
    """The same draft with copies of its arrays: computes the same, shares no cache."""
    from mlx.utils import tree_map

    copy = type(draft)(draft.args)
    copy.update(tree_map(lambda x: x * 1, draft.parameters()))
    copy.eval()
    return copy


@pytest.fixture(scope="session")
def untied_loaded(tmp_path_factory: pytest.TempPathFactory):
    """(target, random_draft, self_draft, tokenizer) with untied random heads."""
    from mlx_lm import load

    target_path, draft_path = write_untied_pair(tmp_path_factory.mktemp("untied"))
    target, tokenizer = load(str(target_path))
    draft, _ = load(str(draft_path))
    return target, draft, self_draft(target, 2), tokenizer


def sharpened_copy(path: Path, factor: float) -> Any:
    """A second instance of the model at `path` with its (untied) head scaled by `factor`:
    a draft that ranks tokens like the target but is more (factor > 1) or less peaked, so p
    and q overlap without being equal and the residual resampling matters a lot."""
    from mlx_lm import load

    model, _ = load(str(path))
    model.lm_head.weight = model.lm_head.weight * factor
    return model


def chi_square_p_value(observed: list[int], expected: list[float], min_expected: float = 5.0):
    """Pearson's chi-square goodness of fit; cells with small expectations are pooled.

    The p-value uses the Wilson-Hilferty normal approximation (no scipy here); it is accurate
    to a few percent in the tails that matter for a 1e-3 threshold.
    """
    import math

    pairs = sorted(zip(expected, observed, strict=True), reverse=True)
    if any(e <= 0 and o > 0 for e, o in pairs):
        return 0.0, math.inf, len(pairs) - 1  # an impossible outcome happened
    cells: list[list[float]] = []
    pool = [0.0, 0.0]
    for e, o in pairs:
        if e >= min_expected:
            cells.append([e, o])
        else:
            pool[0] += e
            pool[1] += o
    if pool[0] > 0:
        cells.append(pool)
    stat = sum((o - e) ** 2 / e for e, o in cells if e > 0)
    df = max(len(cells) - 1, 1)
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2)), stat, df

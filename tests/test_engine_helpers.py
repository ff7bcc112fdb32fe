"""Tiny models for engine tests whose greedy output is not degenerate.

The shared tiny models tie their output head to large random embeddings, so every one of them
just repeats the last prompt token at temperature 0 and any draft "agrees" with any target.
Giving them an untied random head makes the next token a varied function of the context, so a
random draft really disagrees with the target, a shallow self-draft agrees sometimes, and
greedy equality tests mean something.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from speclora.daemon.tiny import TinyModelSpec, write_tiny_model


def write_untied_model(path: Path, spec: TinyModelSpec, head_scale: float = 1.0) -> Path:
    import mlx.core as mx

    write_tiny_model(path, spec)
    weights = mx.load(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config, indent=2))
    vocab, hidden = weights["model.embed_tokens.weight"].shape
    weights["lm_head.weight"] = head_scale * mx.random.normal(
        (vocab, hidden), key=mx.random.key(spec.seed + 7)
    )
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
    params = dict(tree_flatten(target.parameters()))
    draft.load_weights([(k, params[k]) for k, _ in tree_flatten(draft.parameters())])
    draft.eval()
    return draft


@pytest.fixture(scope="session")
def untied_loaded(tmp_path_factory: pytest.TempPathFactory):
    """(target, random_draft, self_draft, tokenizer) with untied random heads."""
    from mlx_lm import load

    target_path, draft_path = write_untied_pair(tmp_path_factory.mktemp("untied"))
    target, tokenizer = load(str(target_path))
    draft, _ = load(str(draft_path))
    return target, draft, self_draft(target, 2), tokenizer

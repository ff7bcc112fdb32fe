"""A toy domain for fast tests, smoke benchmarks and demos of the learning loop.

Random tiny models (speclora.daemon.tiny) mostly copy their input token with probability ~1,
so every draft agrees with them and there is nothing to learn. Here a tiny target is taught
a small grammar for a few seconds: it then behaves like a (very) small language model of one
domain, its shallow self-draft disagrees with it often, and distillation has a structure to
pick up and generalise to new prompts of the same family.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import structlog
from speclora.daemon.tiny import TinyModelSpec, write_tiny_model

log = structlog.get_logger(__name__)

ADJECTIVES = ("quick", "lazy", "brown", "small", "large", "quiet")
NOUNS = ("fox", "dog", "sea", "moon", "tide", "draft")
VERBS = ("jumps", "rests", "waits", "folds", "runs")
TOPICS = (
    "sea", "moon", "forest", "river", "city", "winter", "summer", "mountain", "rain", "night",
    "dog", "cat", "bird", "fire", "snow", "wind", "stone", "star", "tree", "cloud",
)  # fmt: skip
UNRELATED = (
    "1 2 3 4 5 6 7 8 9 10",
    "def add(a, b): return a + b",
    "Paris is the capital of France.",
    "café naïve résumé",
    "Explain quantum computing simply.",
    "for i in range(10): print(i * 2)",
)


def domain_sentence(rng: random.Random) -> str:
    """One sentence of the toy grammar ("The quick fox jumps over the moon.")."""
    return (
        f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
        f"over the {rng.choice(NOUNS)}."
    )


def domain_prompts(n: int, seed: int = 0) -> list[str]:
    """User messages of the domain family ("Write about the moon.", ...)."""
    rng = random.Random(seed)
    return [f"Write about the {rng.choice(TOPICS)}." for _ in range(n)]


def unrelated_prompts(n: int) -> list[str]:
    return [UNRELATED[i % len(UNRELATED)] for i in range(n)]


def _domain_batch(tokenizer: object, seed: int, n: int = 256) -> tuple[object, object]:
    """(ids, mask) of n chat-templated domain requests with two grammar sentences each."""
    import mlx.core as mx
    import numpy as np

    rng = random.Random(seed)
    sequences = []
    for _ in range(n):
        prompt = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": f"Write about the {rng.choice(TOPICS)}."}],
            add_generation_prompt=True,
        )
        text = " ".join(domain_sentence(rng) for _ in range(2))
        eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
        sequences.append(list(prompt) + tokenizer.encode(text) + [eos])  # type: ignore[attr-defined]
    length = max(map(len, sequences))
    ids = np.zeros((len(sequences), length), np.int32)
    mask = np.zeros((len(sequences), length - 1), np.float32)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s) - 1] = 1.0
    return mx.array(ids), mx.array(mask)


def write_distilled_draft(
    path: Path, target_path: Path, *, num_layers: int = 2, steps: int = 200, seed: int = 1
) -> Path:
    """Write a separate tiny draft distilled to agree with the toy target at `target_path`:
    a good pre-trained draft (teacher-forced acceptance ~0.9 on the domain) of the kind a real
    pair has, for testing that training does not make a good draft worse. Reuses `path`."""
    if (path / "model.safetensors").exists() and (path / "speclora_toy.json").exists():
        return path
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load

    target, tokenizer = load(str(target_path))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_model(tmp, TinyModelSpec(num_layers=num_layers, seed=seed + 7))
    draft, _ = load(str(tmp))
    ids, mask = _domain_batch(tokenizer, seed + 100)
    teacher = mx.softmax(target(ids[:, :-1]).astype(mx.float32), axis=-1)
    mx.eval(teacher)

    def loss_fn(x: mx.array, p: mx.array, m: mx.array) -> mx.array:
        logq = nn.log_softmax(draft(x[:, :-1]).astype(mx.float32), axis=-1)
        kl = (p * (mx.log(mx.maximum(p, 1e-9)) - logq)).sum(axis=-1)
        return (kl * m).sum() / m.sum()

    mx.random.seed(seed)
    optimizer = optim.Adam(learning_rate=1e-2)
    step_fn = nn.value_and_grad(draft, loss_fn)
    order = np.random.default_rng(seed)
    loss = mx.array(0.0)
    for _ in range(steps):
        batch = mx.array(order.choice(ids.shape[0], 16, replace=False))
        loss, grads = step_fn(ids[batch], teacher[batch], mask[batch])
        optimizer.update(draft, grads)
        mx.eval(draft.parameters(), optimizer.state)
    weights = dict(tree_flatten(draft.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "speclora_toy.json").write_text(json.dumps({"steps": steps, "kl": loss.item()}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    log.info("toy_draft_distilled", path=str(path), kl=round(loss.item(), 3))
    return path


def write_domain_target(
    path: Path, *, steps: int = 120, seed: int = 0, spec: TinyModelSpec | None = None
) -> Path:
    """Write a tiny target trained on the domain grammar (mlx-lm layout); reuses `path`."""
    if (path / "model.safetensors").exists() and (path / "speclora_toy.json").exists():
        return path
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_model(tmp, spec or TinyModelSpec(num_layers=4, seed=seed))
    model, tokenizer = load(str(tmp))
    ids_mx, mask_mx = _domain_batch(tokenizer, seed)

    def loss_fn(x: mx.array, m: mx.array) -> mx.array:
        logits = model(x[:, :-1])
        return (nn.losses.cross_entropy(logits, x[:, 1:]) * m).sum() / m.sum()

    mx.random.seed(seed)
    optimizer = optim.Adam(learning_rate=1e-2)
    step_fn = nn.value_and_grad(model, loss_fn)
    order = np.random.default_rng(seed)
    loss = mx.array(0.0)
    for _ in range(steps):
        batch = mx.array(order.choice(ids_mx.shape[0], 16, replace=False))
        loss, grads = step_fn(ids_mx[batch], mask_mx[batch])
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "speclora_toy.json").write_text(json.dumps({"steps": steps, "loss": loss.item()}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    log.info("toy_target_written", path=str(path), loss=round(loss.item(), 3))
    return path

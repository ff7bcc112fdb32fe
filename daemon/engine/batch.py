"""Batched passes: one forward over several generations' tokens, each with its own cache.

A detailed generation asks for its target (and draft) passes by yielding a `ForwardPass` (the
tokens to run and the KV cache to run them on) instead of calling the model; whoever drives it sends the
logits back. Alone (`ForwardPass.run`), that is the model's own call, so a single request runs
exactly as it would without batching. The worker collects every active generation's pass of a
round and runs them as one (`run_passes`).

How a batch runs. The rows are ragged: each request brings its own number of tokens (K + 1 to
verify, 1 for a plain step) and its own cache at its own offset, and after verification each
rewinds by its own count. So the tokens are concatenated into one sequence for everything that
is per token (embedding, norms, the q/k/v/o projections, the MLP, the head: the weights are
read once for all rows, which is what makes a CPU pass over many rows cheap), and split per
request only for attention, where each request's queries meet its own cache with its own
positions and mask. mlx-lm's `BatchKVCache` does not fit this: its rows share one offset (left
padding), so a per-row rewind after verification, and the prompt cache's per-request caches,
would need copies in and out every round. Per-request caches need none.

Within a batch each row's logits are the model's own for that row, bit for bit in the sizes
measured here (up to ~20 rows of the embedded model); wider products may sum in another order
in the last bits (BLAS blocking), which can flip a greedy choice only between near-ties.

Architectures: the attention glue below mirrors mlx-lm's Llama / Mistral / Qwen2 / Qwen3
blocks (checked against their sources); any other model, or one with sliding-window layers,
runs its rows one after another, which is what the worker did before batching.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from speclora.daemon import cpu_rope
from speclora.daemon.engine.draft_vocab import GreedyHead, model_parts
from speclora.daemon.engine.events import ForwardPass

T = TypeVar("T")

# mlx-lm modules whose TransformerBlock is exactly `h = x + attn(norm(x)); h + mlp(norm(h))`
# and whose Attention is the q/k/v projections, optional q/k norms, RoPE at the cache's offset,
# the cache update, SDPA and o_proj (see `_attention`).
_BATCHABLE_MODULES = frozenset(
    {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"}
)
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads")


@dataclass
class BatchWidth:
    """How wide the worker's last shared target forward was (the worker writes it, the
    generations read it to price their steps: controller.price_for_batch)."""

    tokens: int = 0  # every row's tokens
    rows: int = 0

    def others(self, own: int) -> int:
        """Tokens of the other rows, for a request whose own row had `own` tokens."""
        return max(0, self.tokens - own) if self.rows > 1 else 0


def batchable(model: Any) -> bool:
    """True when several rows of `model` can share one forward (see the module docstring)."""
    if not model_parts(model).splittable:
        return False
    layers = getattr(model.model, "layers", None)
    if not layers:
        return False
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if type(layer).__module__ not in _BATCHABLE_MODULES or attn is None:
            return False
        if getattr(layer, "use_sliding", False):
            return False
        if not all(hasattr(attn, name) for name in _ATTENTION_PARTS):
            return False
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
                return False
    return True


def run_passes(passes: Sequence[ForwardPass]) -> tuple[list[mx.array], int]:
    """The logits of each pass (lazy), sharing forwards where they can: passes on the same
    batchable model run as one; anything else runs alone. Also: how many forwards ran."""
    out: list[mx.array | None] = [None] * len(passes)
    forwards = 0
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(passes):
        groups.setdefault(id(p.model), []).append(i)
    for members in groups.values():
        model = passes[members[0]].model
        if len(members) == 1 or not batchable(model):
            for i in members:
                out[i] = passes[i].run()
            forwards += len(members)
            continue
        forwards += 1
        rows = batched_forward(model, [passes[i] for i in members])
        for i, logits in zip(members, rows, strict=True):
            out[i] = logits
    return out, forwards  # type: ignore[return-value]


def batched_forward(model: Any, passes: Sequence[ForwardPass]) -> list[mx.array]:
    """One forward of a batchable model over every pass's tokens; each cache advances by its
    own pass's tokens. Returns each pass's answer: its (width, V) logits, or its head's."""
    widths = [p.width for p in passes]
    starts = [0]
    for w in widths:
        starts.append(starts[-1] + w)
    inner = model.model
    h = inner.embed_tokens(mx.concatenate([p.tokens for p in passes]))[None]
    masks = [
        create_attention_mask(h[:, s : s + w], p.cache[0])
        for p, s, w in zip(passes, starts, widths, strict=False)
    ]
    # Every token's position (each layer's cache of a request is at the same offset here), so
    # RoPE runs once per layer for all rows: each token as its own batch row, at its offset.
    # (Made by cpu_rope.positions: a literal nobody updates, so RoPE makes its tables once.)
    positions = cpu_rope.positions(
        [p.cache[0].offset + i for p, w in zip(passes, widths, strict=True) for i in range(w)]
    )
    for index, layer in enumerate(inner.layers):
        attn_in = layer.input_layernorm(h)
        caches = [p.cache[index] for p in passes]
        h = h + _attention(layer.self_attn, attn_in, starts, positions, caches, masks)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    hidden = inner.norm(h)[0]
    rows = [hidden[s : s + w] for s, w in zip(starts, widths, strict=False)]
    plain = [i for i, p in enumerate(passes) if p.head is None]
    greedy = [i for i, p in enumerate(passes) if isinstance(p.head, GreedyHead)]
    out: list[Any] = [
        None if p.head is None or isinstance(p.head, GreedyHead) else p.head(row)
        for p, row in zip(passes, rows, strict=True)
    ]
    parts = model_parts(model)
    if greedy:  # T = 0 verify passes: one (sliced) head product over all their rows
        following = mx.concatenate([passes[i].head.next_tokens for i in greedy])
        scores = parts.greedy_rows(mx.concatenate([rows[i] for i in greedy]), following)
        _hand_out(scores, greedy, widths, out)
    if plain:  # the model's own head, one product over every row that wants it
        both = hidden if len(plain) == len(passes) else mx.concatenate([rows[i] for i in plain])
        _hand_out(parts.head(both[None])[0], plain, widths, out)
    return out


def _hand_out(answer: Any, members: list[int], widths: list[int], out: list[Any]) -> None:
    """Split one head product over `members`' rows (concatenated in that order) back into
    `out`, each its own `widths[i]` rows."""
    at = 0
    for i in members:
        out[i] = answer[at : at + widths[i]]
        at += widths[i]


def _attention(
    attn: Any,
    x: mx.array,
    starts: list[int],
    positions: mx.array,
    caches: list[Any],
    masks: list[Any],
) -> mx.array:
    """mlx-lm's Attention.__call__ over concatenated rows: projections, norms and RoPE for all
    rows at once; cache update and SDPA per row."""
    total = x.shape[1]
    queries = attn.q_proj(x).reshape(total, attn.n_heads, -1)
    keys = attn.k_proj(x).reshape(total, attn.n_kv_heads, -1)
    values = attn.v_proj(x).reshape(total, attn.n_kv_heads, -1)
    if getattr(attn, "q_norm", None) is not None:
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    # (tokens, heads, 1, dim): RoPE's batch axis is the token, its offset the position.
    queries = attn.rope(queries[:, :, None], offset=positions)
    keys = attn.rope(keys[:, :, None], offset=positions)
    outputs = []
    for i, cache in enumerate(caches):
        s, e = starts[i], starts[i + 1]
        q = queries[s:e].transpose(2, 1, 0, 3)  # (1, heads, n, dim)
        k = keys[s:e].transpose(2, 1, 0, 3)
        v = values[s:e][None].transpose(0, 2, 1, 3)
        k, v = cache.update_and_fetch(k, v)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=masks[i])
        outputs.append(o.transpose(0, 2, 1, 3).reshape(1, e - s, -1))
    return attn.o_proj(mx.concatenate(outputs, axis=1))


def run_alone(steps: Generator[ForwardPass, mx.array, T]) -> T:
    """Drive one of the decoder's step generators with each pass run alone; its result."""
    logits = None
    while True:
        try:
            request = steps.send(logits)
        except StopIteration as done:
            return done.value
        logits = request.run()

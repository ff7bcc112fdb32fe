"""LoRA distillation of the draft towards the target on recorded failure cases.

Loss: KL(target || draft) at every position that predicts a completion token, with the target
run teacher-forced over the stored token ids (nothing but ids is stored) and positions where
the draft's proposal was rejected weighted up (Online Speculative Decoding's idea). The
target's distributions are computed once per case per run and kept in memory as their top-k
(plus one bucket for the remaining mass), which is exact where it matters for acceptance and
small enough to cache for thousands of positions; `teacher_top_k = 0` keeps full rows.

Evaluation is the engine's own acceptance rule in expectation, by teacher forcing, so it
needs no generation: at temperature 0 a position counts 1 when the draft's argmax equals the
target's; at T > 0 it counts sum_x min(p(x), q(x)) of the tempered distributions.

Only logits at loss positions go through the LM head (a large part of a small draft's cost),
when the model's body/head split is recognised; otherwise the full forward is used.

When the daemon serves with a cheap draft head (a frequency-ranked draft vocabulary S), the
draft is trained and measured as it serves: its logits cover S only, the teacher is the
target's distribution conditioned on S, and a position counts as accepted only if the draft's
choice within S is the target's choice over the full vocabulary. Scoring S (~4100 rows)
instead of all 49152 rows of SmolLM2's head makes a training step ~2.7x cheaper.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from speclora.daemon.engine.draft_vocab import model_parts
from speclora.daemon.learning import lora
from speclora.daemon.learning.store import FailureCase


@dataclass(frozen=True)
class Example:
    """One case as model input: `tokens` in, loss at positions first .. len(tokens) - 2."""

    case_id: int
    prompt_key: str  # the same prompt gives the same key, whichever case recorded it
    tokens: tuple[int, ...]
    first: int  # first position whose logits predict a completion token
    weights: tuple[float, ...]  # one per loss position
    temperature: float

    @property
    def positions(self) -> range:
        return range(self.first, len(self.tokens) - 1)


@dataclass
class TeacherRows:
    """The target's distributions at one example's loss positions (top-k or full)."""

    logp: mx.array  # (n, k) log-probs of the top-k tokens, or (n, V) full log-probs
    index: mx.array | None  # (n, k) token ids of the top-k; None for full rows
    logp_rest: mx.array | None  # (n,) log of the mass outside the top-k
    # (n,) the target's greedy token over the full vocabulary: what a draft must propose to be
    # accepted at T = 0 (the stability guard scores training cases with it, no target pass).
    choice: mx.array | None = None


def prepare_examples(
    cases: Sequence[FailureCase], max_seq_len: int, rejected_weight: float
) -> list[Example]:
    """Token sequences with per-position weights; long cases keep their last tokens."""
    examples = []
    for case in cases:
        seq = list(case.prompt_ids) + list(case.completion_ids)
        n_prompt = len(case.prompt_ids)
        cut = max(0, len(seq) - max_seq_len)
        tokens = seq[cut:]
        first = max(n_prompt - 1 - cut, 0)
        rejected = set(case.rejection_positions)
        # Position i (in `tokens`) predicts completion index i + cut + 1 - n_prompt.
        weights = tuple(
            rejected_weight if (i + cut + 1 - n_prompt) in rejected else 1.0
            for i in range(first, len(tokens) - 1)
        )
        if weights:
            examples.append(
                Example(
                    int(case.id or 0),
                    prompt_key(case.prompt_ids),
                    tuple(tokens),
                    first,
                    weights,
                    case.temperature,
                )
            )
    return examples


def prompt_key(prompt_ids: Sequence[int]) -> str:
    return hashlib.blake2b(repr(tuple(prompt_ids)).encode(), digest_size=8).hexdigest()


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by prompt: a case stays on its side across runs, and every case of
    one prompt (a retried or repeated request) lands on the same side. Split by case id, a
    repeated prompt would sit on both sides and the gate would score memorisation."""
    return int(key, 16) / 2**64 < fraction


def split_examples(
    examples: Sequence[Example], heldout_fraction: float
) -> tuple[list[Example], list[Example]]:
    train = [e for e in examples if not is_heldout(e.prompt_key, heldout_fraction)]
    heldout = [e for e in examples if is_heldout(e.prompt_key, heldout_fraction)]
    # A store of few prompts can land all on one side; move one prompt across (the newest
    # case's to held-out, the oldest case's to train) so both sides have one.
    if not heldout and len(train) > 1:
        heldout = _take_prompt_of(train, -1)
    if not train and len(heldout) > 1:
        train = _take_prompt_of(heldout, 0)
    return train, heldout


def _take_prompt_of(side: list[Example], index: int) -> list[Example]:
    """Remove and return every case with the prompt of `side[index]`, so no copy stays behind;
    just that case when the side holds nothing else (one prompt cannot be split)."""
    key = side[index].prompt_key
    moved = [e for e in side if e.prompt_key == key]
    if len(moved) == len(side):
        moved = [side[index]]
    for e in moved:
        side.remove(e)
    return moved


def token_batches(examples: Sequence[Example], max_tokens: int) -> list[list[Example]]:
    """Consecutive groups of examples of at most `max_tokens` padded tokens (>= 1 example)."""
    batches: list[list[Example]] = []
    current: list[Example] = []
    longest = 0
    for e in examples:
        longest_with = max(longest, len(e.tokens))
        if current and longest_with * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_with = [], len(e.tokens)
        current.append(e)
        longest = longest_with
    if current:
        batches.append(current)
    return batches


def _inputs(batch: Sequence[Example]) -> tuple[mx.array, mx.array]:
    """Right-padded input ids (B, L) and the flat indices of every loss position."""
    length = max(len(e.tokens) for e in batch)
    ids = np.zeros((len(batch), length), dtype=np.int32)
    flat: list[int] = []
    for b, e in enumerate(batch):
        ids[b, : len(e.tokens)] = e.tokens
        flat.extend(b * length + i for i in e.positions)
    return mx.array(ids), mx.array(np.asarray(flat, dtype=np.int32))


CHOICE_CHUNK = 256  # rows per full-head block when a restricted teacher also needs its argmax


class LossPositionLogits:
    """logits at chosen positions only: body once, LM head on the rows that need it.

    The split (model.model -> hidden, then lm_head or tied embeddings) is checked once
    against the model's own forward; when it does not match, the full forward is used.
    """

    def __init__(self, model: nn.Module, ids: mx.array | None = None) -> None:
        self.model = model
        self._split: Callable[[mx.array], tuple[mx.array, Callable[[mx.array], mx.array]]]
        self._split_ok = self._check_split()
        # Restricted head: logits for `ids` only (column j is token ids[j]).
        rows = model_parts(model).head_rows(ids) if ids is not None and self._split_ok else None
        self.ids = ids if rows is not None else None
        self._rows = rows

    def _body_head(self, inputs: mx.array) -> tuple[mx.array, Callable[[mx.array], mx.array]]:
        m = self.model
        hidden = m.model(inputs)
        if "lm_head" in m:
            return hidden, m.lm_head
        return hidden, m.model.embed_tokens.as_linear

    def _check_split(self) -> bool:
        try:
            probe = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
            hidden, head = self._body_head(probe)
            ok = mx.allclose(head(hidden), self.model(probe), atol=1e-4, rtol=1e-4).item()
            return bool(ok)
        except Exception:  # a model whose anatomy we do not know: use its own forward
            return False

    def logits_and_choice(
        self, inputs: mx.array, flat: mx.array, vocab: int
    ) -> tuple[mx.array, mx.array]:
        """(logits as __call__ gives them, the greedy token over the full vocabulary) from one
        pass of the body: a restricted head's argmax is not the model's choice."""
        b, length = inputs.shape
        if not self._split_ok or self._rows is None:
            logits = self(inputs, flat)
            return logits, mx.argmax(logits[:, :vocab], axis=-1)
        hidden, head = self._body_head(inputs)
        rows = hidden.reshape(b * length, -1)[flat]
        logits = (rows @ self._rows.T).astype(mx.float32)
        # The full head in chunks of rows: a (rows x 49152) block at once is ~400 MB.
        parts = [
            mx.argmax(head(rows[i : i + CHOICE_CHUNK])[:, :vocab], axis=-1)
            for i in range(0, rows.shape[0], CHOICE_CHUNK)
        ]
        choice = mx.concatenate(parts) if parts else mx.zeros((0,), dtype=mx.uint32)
        return logits, choice

    def __call__(self, inputs: mx.array, flat: mx.array) -> mx.array:
        b, length = inputs.shape
        if self._split_ok:
            hidden, head = self._body_head(inputs)
            rows = hidden.reshape(b * length, -1)[flat]
            if self._rows is not None:
                return (rows @ self._rows.T).astype(mx.float32)
            return head(rows).astype(mx.float32)
        logits = self.model(inputs)
        return logits.reshape(b * length, -1)[flat].astype(mx.float32)


def _log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def teacher_rows(
    target: LossPositionLogits, batch: Sequence[Example], top_k: int, vocab: int
) -> list[TeacherRows]:
    """The target's teacher-forced distributions for a batch, split per example."""
    inputs, flat = _inputs(batch)
    logits, choice = target.logits_and_choice(inputs, flat, vocab)
    choice = choice.astype(mx.int32)
    logp = _log_softmax(logits[:, :vocab])
    if 0 < top_k < logp.shape[-1]:  # a restricted head may be narrower than `vocab`
        index = mx.argpartition(-logp, kth=top_k - 1, axis=-1)[:, :top_k].astype(mx.int32)
        logp_k = mx.take_along_axis(logp, index, axis=-1)
        rest = mx.log(mx.maximum(1.0 - mx.exp(logp_k).sum(axis=-1), 1e-9))
        mx.eval(index, logp_k, rest, choice)
    else:
        index, logp_k, rest = None, logp, None
        mx.eval(logp_k, choice)
    out, start = [], 0
    for e in batch:
        n = len(e.weights)
        sl = slice(start, start + n)
        out.append(
            TeacherRows(
                logp_k[sl],
                None if index is None else index[sl],
                None if rest is None else rest[sl],
                choice[sl],
            )
        )
        start += n
    return out


def shuffle_teacher(rows: list[TeacherRows], seed: int) -> list[TeacherRows]:
    """Permute teacher rows across all positions: a deliberately wrong target (ablation)."""
    sizes = [r.logp.shape[0] for r in rows]
    perm = mx.array(np.random.default_rng(seed).permutation(sum(sizes)).astype(np.int32))

    def cat(get: Callable[[TeacherRows], Any]) -> Any:
        parts = [get(r) for r in rows]
        return None if parts[0] is None else mx.concatenate(parts)[perm]

    logp, index, rest = cat(lambda r: r.logp), cat(lambda r: r.index), cat(lambda r: r.logp_rest)
    choice = cat(lambda r: r.choice)
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append(
            TeacherRows(
                logp[sl],
                None if index is None else index[sl],
                None if rest is None else rest[sl],
                None if choice is None else choice[sl],
            )
        )
        start += n
    return out


def weighted_kl(
    draft_logits: mx.array,
    logp: mx.array,
    index: mx.array | None,
    logp_rest: mx.array | None,
    weights: mx.array,
) -> mx.array:
    """sum_i w_i KL(p_i || q_i) / sum_i w_i over rows; top-k rows carry one rest bucket."""
    kl = kl_rows(draft_logits, logp, index, logp_rest)
    return (kl * weights).sum() / weights.sum()


def kl_rows(
    draft_logits: mx.array, logp: mx.array, index: mx.array | None, logp_rest: mx.array | None
) -> mx.array:
    """KL(p_i || q_i) per row."""
    logq = _log_softmax(draft_logits)
    if index is None:
        return (mx.exp(logp) * (logp - logq)).sum(axis=-1)
    logq_k = mx.take_along_axis(logq, index, axis=-1)
    q_rest = mx.maximum(1.0 - mx.exp(logq_k).sum(axis=-1), 1e-9)
    kl = (mx.exp(logp) * (logp - logq_k)).sum(axis=-1)
    return kl + mx.exp(logp_rest) * (logp_rest - mx.log(q_rest))


def expected_acceptance(
    target: LossPositionLogits,
    draft: LossPositionLogits,
    batch: Sequence[Example],
    vocab: int,
) -> tuple[float, int]:
    """(sum of per-position expected acceptance, positions) under the engine's rule.

    `target` scores the full vocabulary; a `draft` restricted to ids S proposes only from S
    (q is zero outside it), as the cheap head does when serving."""
    inputs, flat = _inputs(batch)
    t = target(inputs, flat)[:, :vocab]
    d = draft(inputs, flat)[:, :vocab]
    temps = mx.array(
        np.concatenate([np.full(len(e.weights), e.temperature, np.float32) for e in batch])
    )
    choice = mx.argmax(d, axis=-1)
    if draft.ids is not None:
        choice = draft.ids[choice]
    greedy = (mx.argmax(t, axis=-1) == choice).astype(mx.float32)
    safe_t = mx.maximum(temps, 1e-6)[:, None]
    p = mx.softmax(t / safe_t, axis=-1)
    if draft.ids is not None:
        p = p[:, draft.ids]
    q = mx.softmax(d / safe_t, axis=-1)
    sampled = mx.minimum(p, q).sum(axis=-1)
    per_position = mx.where(temps == 0, greedy, sampled)
    total = per_position.sum().item()
    return float(total), int(flat.shape[0])


def vocab_size(target: nn.Module, draft: nn.Module) -> int:
    """Shared vocabulary width (drafts may pad their head differently)."""
    probe = mx.array([[1]], dtype=mx.int32)
    return int(min(target(probe).shape[-1], draft(probe).shape[-1]))


MAX_GRAD_NORM = 1.0


def warmup_steps(horizon: int) -> int:
    """Steps of linear learning-rate warm-up for a run of `horizon` steps (1..20)."""
    return max(1, min(20, horizon // 10))


def learning_rate_at(step: int, horizon: int, peak: float, warmup: int | None = None) -> float:
    """Short linear warm-up, then cosine decay to a tenth by `horizon`: stable start, settled
    end. The session may shorten the horizon when a time budget will stop the run early."""
    floor = peak / 10
    warmup = warmup_steps(horizon) if warmup is None else warmup
    if step <= warmup:
        return floor + (peak - floor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DraftTrainer:
    """LoRA training state for one run: a clone of the draft, its optimizer, one step at a time.

    The clone shares every base array with the serving draft (and, for a self-draft, with the
    target), so it costs only the LoRA matrices; the serving draft is untouched until the
    session promotes the result.
    """

    def __init__(
        self,
        draft: nn.Module,
        adapter_config: dict[str, Any],
        *,
        train_norm: bool,
        vocab: int,
        seed: int = 0,
        ids: mx.array | None = None,
    ) -> None:
        self.vocab = vocab
        self.model = lora.clone_tree(draft)
        self.config = adapter_config
        lora.attach(self.model, adapter_config, seed=seed)
        self.train_norm = train_norm
        self.trainable = lora.set_trainable(self.model, train_norm=train_norm)
        self.model.train()
        self.logits = LossPositionLogits(self.model, ids)
        self.optimizer = optim.Adam(learning_rate=0.0)  # set per step by the caller
        self._loss_and_grad = nn.value_and_grad(self.model, self._loss)

    def _loss(
        self,
        inputs: mx.array,
        flat: mx.array,
        logp: mx.array,
        index: mx.array | None,
        rest: mx.array | None,
        weights: mx.array,
    ) -> mx.array:
        logits = self.logits(inputs, flat)[:, : self.vocab]
        return weighted_kl(logits, logp, index, rest, weights)

    def step(
        self, batch: Sequence[Example], teacher: Sequence[TeacherRows], learning_rate: float
    ) -> tuple[float, int]:
        """One optimizer step on a batch; returns (loss, tokens processed)."""
        self.optimizer.learning_rate = learning_rate
        inputs, flat = _inputs(batch)
        logp = mx.concatenate([t.logp for t in teacher])
        index = None if teacher[0].index is None else mx.concatenate([t.index for t in teacher])
        rest = (
            None if teacher[0].logp_rest is None else mx.concatenate([t.logp_rest for t in teacher])
        )
        weights = mx.array(np.concatenate([np.asarray(e.weights, np.float32) for e in batch]))
        loss, grads = self._loss_and_grad(inputs, flat, logp, index, rest, weights)
        # The untrained draft's KL is large (10+ nats): unclipped first steps throw LoRA
        # into a flat, useless optimum.
        grads, _ = optim.clip_grad_norm(grads, MAX_GRAD_NORM)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss)
        return float(loss.item()), int(inputs.size)

    def snapshot(self) -> dict[str, mx.array]:
        """The trainable weights as they are now. MLX arrays are values that an optimizer step
        replaces, never changes, so holding them is a copy that costs nothing."""
        return dict(tree_flatten(self.model.trainable_parameters()))

    def restore(self, weights: dict[str, mx.array]) -> None:
        """Put back the trainable weights of an earlier `snapshot`."""
        self.model.load_weights(list(weights.items()), strict=False)
        mx.eval(self.model.trainable_parameters())

    def score(
        self, batch: Sequence[Example], teacher: Sequence[TeacherRows]
    ) -> list[tuple[float, float, int, int]]:
        """Per example, with dropout off: (sum of w * KL, sum of w, positions where the draft's
        greedy choice is the target's, positions). One draft pass; the target's side is cached."""
        training = self.model.training
        self.model.eval()
        try:
            inputs, flat = _inputs(batch)
            logits = self.logits(inputs, flat)[:, : self.vocab]
            logp = mx.concatenate([t.logp for t in teacher])
            index = None if teacher[0].index is None else mx.concatenate([t.index for t in teacher])
            rest = (
                None
                if teacher[0].logp_rest is None
                else mx.concatenate([t.logp_rest for t in teacher])
            )
            kl = kl_rows(logits, logp, index, rest)
            choice = mx.argmax(logits, axis=-1)
            if self.logits.ids is not None:
                choice = self.logits.ids[choice]
            agree = mx.zeros(choice.shape, dtype=mx.int32)
            if all(t.choice is not None for t in teacher):
                target_choice = mx.concatenate([t.choice for t in teacher])  # type: ignore[misc]
                agree = (choice.astype(mx.int32) == target_choice).astype(mx.int32)
            mx.eval(kl, agree)
        finally:
            self.model.train(training)
        kl_np, agree_np = np.asarray(kl, dtype=np.float64), np.asarray(agree)
        out, start = [], 0
        for e in batch:
            w = np.asarray(e.weights, np.float64)
            sl = slice(start, start + len(w))
            out.append(
                (float((kl_np[sl] * w).sum()), float(w.sum()), int(agree_np[sl].sum()), len(w))
            )
            start += len(w)
        return out

    def finish(self) -> nn.Module:
        """The trained clone, in eval mode (dropout off)."""
        self.model.eval()
        return self.model


def measure_acceptance(
    target: nn.Module,
    draft: nn.Module,
    cases: Sequence[FailureCase],
    *,
    max_seq_len: int = 4096,
    slice_tokens: int = 2048,
    ids: mx.array | None = None,
) -> float:
    """Mean expected acceptance of `draft` on the cases' completions (benchmarks, reports);
    with `ids`, of the draft's head restricted to those tokens."""
    examples = prepare_examples(cases, max_seq_len, 1.0)
    vocab = vocab_size(target, draft)
    t, d = LossPositionLogits(target), LossPositionLogits(draft, ids)
    total, count = 0.0, 0
    for batch in token_batches(examples, slice_tokens):
        s, c = expected_acceptance(t, d, batch, vocab)
        total, count = total + s, count + c
    return total / count if count else 0.0

"""Sampling distributions and the speculative acceptance rules, vectorised over draft positions.

Everything here is an MLX graph builder: nothing forces evaluation, so a whole speculative step
(K draft proposals, one target pass, the accept decision and the correction token) stays one
lazy graph and the engine pays a single host sync per step.

Randomness always comes from explicit `mx.random` keys (never the global state), so a seeded
request is reproducible however many other requests are interleaved with it.

The rule (Leviathan et al. 2023; Chen et al. 2023): a proposal x drawn from the draft's q is
accepted with probability min(1, p(x)/q(x)); at the first rejection the token is resampled from
norm(max(0, p - q)); if every proposal is accepted a bonus token is drawn from p. The output is
then distributed exactly as p, and a proposal is accepted with probability sum(min(p, q)),
against sum(p * q) for mlx-lm's "draft sample == target sample" rule.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import mlx.core as mx
from speclora.daemon.engine.events import SamplingParams

NEG_INF = float("-inf")


def make_key(seed: int | None) -> mx.array:
    """A PRNG key for one request: from the seed, or fresh entropy when unseeded."""
    return mx.random.key(seed if seed is not None else secrets.randbits(63))


def split_key(key: mx.array, num: int = 2) -> list[mx.array]:
    keys = mx.random.split(key, num)
    return [keys[i] for i in range(num)]


def _top_k_mask(logits: mx.array, top_k: int) -> mx.array:
    vocab = logits.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return logits
    drop = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logits, drop, mx.array(NEG_INF, logits.dtype), axis=-1)


def _top_p_mask(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (row-wise)."""
    if top_p >= 1.0:
        return logits
    probs = mx.softmax(logits, axis=-1)
    order = mx.argsort(-logits, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    # A token stays if the mass strictly before it is < top_p; the most likely always stays.
    before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = before < top_p
    keep = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, mx.array(NEG_INF, logits.dtype))


def filtered_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature, then top-k, then top-p, row-wise. Masked tokens get -inf.

    The same function shapes the target's p and the draft's q (the rule needs both filtered
    the same way) and the fast mode's sampler, so every mode samples the same distribution.
    """
    logits = logits.astype(mx.float32)
    if params.temperature > 0:
        logits = logits * (1.0 / params.temperature)
    logits = _top_k_mask(logits, params.top_k)
    return _top_p_mask(logits, params.top_p)


def probabilities(logits: mx.array, params: SamplingParams) -> mx.array:
    """The sampling distribution p (or q) for each row of logits."""
    return mx.softmax(filtered_logits(logits, params), axis=-1)


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None) -> mx.array:
    """One token per row: argmax when greedy, else a draw from the filtered distribution."""
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(filtered_logits(logits, params), axis=-1, key=key)


def token_probs(probs: mx.array, tokens: mx.array) -> mx.array:
    """probs[i, tokens[i]] for each row i."""
    return mx.take_along_axis(probs, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]


@dataclass(frozen=True)
class Verdict:
    """A lazy accept decision for one speculative step.

    accepted: scalar, number of leading proposals accepted (0..K).
    next_token: scalar, the token after the accepted prefix (correction or bonus).
    target_probs / draft_probs: p(x_i) and q(x_i) of each proposal (K,), for traces.
    """

    accepted: mx.array
    next_token: mx.array
    target_probs: mx.array
    draft_probs: mx.array


def _leading_true(flags: mx.array) -> mx.array:
    return mx.sum(mx.cumprod(flags.astype(mx.int32), axis=-1), axis=-1)


@dataclass(frozen=True)
class GreedyRows:
    """What T = 0 verification reads from each row of target logits: the argmax, and the
    log-probability of the row's next token (the proposal it verifies; the untempered softmax,
    traced as a confidence). Each is (n,), so a batch's (n, V) logits need not outlive the
    pass (draft_vocab.GreedyHead computes them a vocabulary slice at a time)."""

    choice: mx.array
    next_logp: mx.array

    def __getitem__(self, rows: slice) -> GreedyRows:
        return GreedyRows(self.choice[rows], self.next_logp[rows])


def greedy_rows(logits: mx.array, next_tokens: mx.array) -> GreedyRows:
    """GreedyRows of (n, V) logits; next_tokens: (n,) (any id for a row with no next token)."""
    rows = logits.astype(mx.float32)
    logp = token_probs(rows, next_tokens) - mx.logsumexp(rows, axis=-1)
    return GreedyRows(mx.argmax(logits, axis=-1), logp)


def greedy_verdict(target: GreedyRows, proposals: mx.array, draft_probs: mx.array) -> Verdict:
    """T = 0: accept while the proposal equals the target's argmax; then the target's argmax.

    target: the K + 1 rows after seq[-1] and after each proposal; proposals: (K,);
    draft_probs: (K,) q(x_i) for the trace. The traced target probabilities are the untempered
    softmax's p(x_i), a confidence measure (no (K, V) softmax is materialised for them).
    """
    k = proposals.shape[0]
    accepted = _leading_true(target.choice[:k] == proposals)
    next_token = target.choice[accepted]
    return Verdict(accepted, next_token, mx.exp(target.next_logp[:k]), draft_probs)


def residual(p: mx.array, q: mx.array) -> mx.array:
    """norm(max(0, p - q)) row-wise; where p <= q everywhere (p == q up to rounding) it falls
    back to p, which is then also the exact conditional since rejection had probability 0."""
    r = mx.maximum(p - q, 0.0)
    mass = mx.sum(r, axis=-1, keepdims=True)
    return mx.where(mass > 1e-9, r / mx.maximum(mass, 1e-30), p)


def speculative_verdict(p: mx.array, q: mx.array, proposals: mx.array, key: mx.array) -> Verdict:
    """T > 0: the speculative sampling rule, all K positions at once.

    p: (K+1, V) target distributions (already filtered); q: (K, V) draft distributions the
    proposals were drawn from; proposals: (K,). Uniforms for the K accept tests and one draw from
    each candidate row (K residuals + the bonus row p[K]) come from `key`; the row chosen by the
    accepted count is the next token, so no host round trip sits between accept and resample.
    """
    k = proposals.shape[0]
    accept_key, resample_key = split_key(key)
    px = token_probs(p[:k], proposals)
    qx = token_probs(q, proposals)
    u = mx.random.uniform(shape=(k,), key=accept_key)
    # u < p/q without dividing; q(x) > 0 since x was drawn from q.
    accepted = _leading_true(u * qx < px)
    candidates = mx.concatenate([residual(p[:k], q), p[k:]], axis=0)
    draws = mx.random.categorical(mx.log(candidates), axis=-1, key=resample_key)
    return Verdict(accepted, draws[accepted], px, qx)


def point_mass_verdict(p: mx.array, proposals: mx.array, key: mx.array) -> Verdict:
    """T > 0 for deterministic proposals (history): the same rule with q a point mass at x.

    min(1, p(x)/q(x)) = p(x), and norm(max(0, p - q)) is p with x removed, renormalised; so
    accept x with probability p(x), else draw from p without x. The output is distributed as p.
    p: (K+1, V) filtered target distributions; proposals: (K,).
    """
    k = proposals.shape[0]
    accept_key, resample_key = split_key(key)
    px = token_probs(p[:k], proposals)
    u = mx.random.uniform(shape=(k,), key=accept_key)
    accepted = _leading_true(u < px)
    columns = mx.arange(p.shape[-1])[None, :]
    without = mx.where(columns == proposals[:, None].astype(columns.dtype), 0.0, p[:k])
    mass = mx.sum(without, axis=-1, keepdims=True)
    # A rejection of x with p(x) = 1 has probability 0; fall back to p to stay well defined.
    without = mx.where(mass > 1e-9, without / mx.maximum(mass, 1e-30), p[:k])
    candidates = mx.concatenate([without, p[k:]], axis=0)
    draws = mx.random.categorical(mx.log(candidates), axis=-1, key=resample_key)
    return Verdict(accepted, draws[accepted], px, mx.ones_like(px))


def expected_acceptance(p: mx.array, q: mx.array) -> tuple[mx.array, mx.array]:
    """(ours, mlx-lm's) expected per-proposal acceptance: sum(min(p, q)) and sum(p * q)."""
    return mx.sum(mx.minimum(p, q), axis=-1), mx.sum(p * q, axis=-1)

"""The sampling distributions and the speculative acceptance rule, on synthetic p and q."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from speclora.daemon.engine.events import SamplingParams
from speclora.daemon.engine.sampling import (
    Verdict,
    expected_acceptance,
    filtered_logits,
    probabilities,
    residual,
    sample,
    speculative_verdict,
    split_key,
    token_probs,
)
from test_engine_helpers import chi_square_p_value

P = [0.40, 0.25, 0.15, 0.10, 0.07, 0.03]
Q = [0.10, 0.10, 0.20, 0.30, 0.20, 0.10]


def _broken_verdict(p: mx.array, q: mx.array, proposals: mx.array, key: mx.array) -> Verdict:
    """The rule without residual resampling: on rejection draw from p. Not lossless."""
    k = proposals.shape[0]
    accept_key, draw_key = split_key(key)
    px, qx = token_probs(p[:k], proposals), token_probs(q, proposals)
    u = mx.random.uniform(shape=(k,), key=accept_key)
    accepted = mx.sum(mx.cumprod((u * qx < px).astype(mx.int32)))
    draws = mx.random.categorical(mx.log(p), axis=-1, key=draw_key)
    return Verdict(accepted, draws[accepted], px, qx)


def _simulate(p: mx.array, q: mx.array, n: int, verdict_fn=speculative_verdict, seed: int = 0):
    """n independent speculative steps with fixed rows: the emitted tokens of each."""
    key = mx.random.key(seed)
    lazy = []
    for _ in range(n):
        key, propose_key, verdict_key = split_key(key, 3)
        proposals = mx.random.categorical(mx.log(q), axis=-1, key=propose_key)
        v = verdict_fn(p, q, proposals, verdict_key)
        lazy.append((proposals, v.accepted, v.next_token))
    mx.eval(lazy)
    out = []
    for proposals, accepted, nxt in lazy:
        a = int(accepted.item())
        out.append(proposals.tolist()[:a] + [int(nxt.item())])
    return out


def _counts(tokens: list[int], vocab: int) -> list[int]:
    return np.bincount(np.array(tokens, dtype=np.int64), minlength=vocab).tolist()


def _fit(tokens: list[int], dist: list[float]) -> float:
    n = len(tokens)
    return chi_square_p_value(_counts(tokens, len(dist)), [n * x for x in dist])[0]


def test_first_token_is_distributed_as_target():
    p = mx.array([P, P])
    q = mx.array([Q])
    steps = _simulate(p, q, 2500)
    assert _fit([s[0] for s in steps], P) > 1e-3


def test_dropping_residual_resampling_is_detected():
    """Power check: the same test rejects the rule without residual resampling."""
    p = mx.array([P, P])
    q = mx.array([Q])
    steps = _simulate(p, q, 2500, verdict_fn=_broken_verdict)
    assert _fit([s[0] for s in steps], P) < 1e-6


def test_every_position_of_a_long_step_is_distributed_as_target():
    """With K = 3 and different rows, the token at position i (when the step reaches it) is
    distributed as p_i: accepted proposals, residual draws and the bonus token all line up."""
    rows_p = [P, P[::-1], [1 / 6] * 6, P]
    rows_q = [Q, Q, Q[::-1]]
    steps = _simulate(mx.array(rows_p), mx.array(rows_q), 3500, seed=1)
    for i in range(4):
        at_i = [s[i] for s in steps if len(s) > i]
        assert len(at_i) > 300
        assert _fit(at_i, rows_p[i]) > 1e-3, f"position {i}"


def test_acceptance_matches_sum_min_and_beats_mlx_lm_rule():
    p = mx.array([P, P])
    q = mx.array([Q])
    steps = _simulate(p, q, 2000, seed=2)
    rate = sum(len(s) - 1 for s in steps) / len(steps)
    ours, theirs = (x.item() for x in expected_acceptance(mx.array(P), mx.array(Q)))
    assert abs(rate - ours) < 0.03
    assert ours > theirs
    assert rate > theirs + 0.1


def test_identical_distributions_accept_everything():
    p = mx.array([P, P, P])
    steps = _simulate(p, mx.array([P, P]), 500)
    assert all(len(s) == 3 for s in steps)


def test_residual_is_normalised_and_falls_back_to_p():
    r = residual(mx.array([P]), mx.array([Q]))
    expected = np.maximum(np.array(P) - np.array(Q), 0)
    np.testing.assert_allclose(np.array(r[0]), expected / expected.sum(), rtol=1e-5)
    same = residual(mx.array([P]), mx.array([P]))
    np.testing.assert_allclose(np.array(same[0]), P, rtol=1e-5)


def _np_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    x = logits / temperature if temperature > 0 else logits.copy()
    if top_k:
        x[np.argsort(-x)[top_k:]] = -np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros_like(probs, dtype=bool)
    keep[order[before < top_p]] = True
    probs = np.where(keep, probs, 0)
    return probs / probs.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.5), (1.3, 4, 0.8)],
)
def test_filtered_distribution_matches_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(2, 12)).astype(np.float32) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.array(probabilities(mx.array(logits), params))
    for row in range(2):
        want = _np_filter(logits[row].astype(np.float64), temperature, top_k, top_p)
        np.testing.assert_allclose(got[row], want, atol=1e-6)


def test_top_p_keeps_the_most_likely_token():
    logits = mx.array([[5.0, 1.0, 0.0]])
    kept = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert np.isfinite(np.array(kept[0])).tolist() == [True, False, False]


def test_sample_is_reproducible_from_key_and_greedy_is_argmax():
    logits = mx.array([[0.1, 2.0, 0.3, 1.9]])
    params = SamplingParams(temperature=1.0)
    draws_a = [sample(logits, params, mx.random.key(s)).item() for s in range(20)]
    draws_b = [sample(logits, params, mx.random.key(s)).item() for s in range(20)]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 1
    assert sample(logits, SamplingParams(), mx.random.key(0)).item() == 1

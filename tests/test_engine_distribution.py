"""End to end at T > 0: speculative sampling through the whole engine is distributed exactly as
the target, and accepts more than mlx-lm's rule on the same pair."""

from __future__ import annotations

import itertools

import mlx.core as mx
import pytest
from speclora.daemon.engine import DraftVocab, GenerationRequest, SamplingParams, generate
from speclora.daemon.engine.sampling import Verdict, probabilities, split_key, token_probs
from speclora.daemon.tiny import TinyModelSpec
from speclora.shared.config import SpeculationConfig
from test_engine_helpers import chi_square_p_value, sharpened_copy, write_untied_model

PROMPT = "Hello"
PARAMS = dict(temperature=1.0, top_k=4)
N = 1200


@pytest.fixture(scope="module")
def spread_pair(tmp_path_factory):
    """A target with fairly flat next-token distributions and a draft that ranks tokens like it
    but is three times as peaked: p and q overlap (~0.8) without being equal."""
    from mlx_lm import load

    path = write_untied_model(
        tmp_path_factory.mktemp("spread"), TinyModelSpec(num_layers=2, seed=3), head_scale=0.6
    )
    target, tokenizer = load(str(path))
    return target, sharpened_copy(path, 3.0), tokenizer


def _exact_joint(target, ids: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    """P(first two tokens) under target-only sampling, from the target's own forwards."""
    first = probabilities(target(mx.array([ids]))[0, -1], params)
    joint = {}
    for x1 in [i for i, v in enumerate(first.tolist()) if v > 0]:
        second = probabilities(target(mx.array([ids + [x1]]))[0, -1], params).tolist()
        for x2, v in enumerate(second):
            if v > 0:
                joint[(x1, x2)] = first[x1].item() * v
    return joint


def _sample_pairs(target, draft, tokenizer, n: int, **kw) -> list[tuple[int, int]]:
    spec = SpeculationConfig()
    pairs = []
    for seed in range(n):
        request = GenerationRequest(
            prompt=PROMPT, raw=True, max_tokens=3, draft_tokens=2,
            sampling=SamplingParams(**PARAMS, seed=seed),
        )  # fmt: skip
        *_, summary = generate(target, draft, tokenizer, request, spec, **kw)
        pairs.append(tuple(summary.completion_token_ids[:2]))
    return pairs


def _p_value(pairs, joint) -> float:
    cells = sorted(set(joint) | set(pairs))
    observed = [sum(1 for p in pairs if p == c) for c in cells]
    expected = [len(pairs) * joint.get(c, 0.0) for c in cells]
    return chi_square_p_value(observed, expected)[0]


def _broken_verdict(p, q, proposals, key) -> Verdict:
    """Without residual resampling (draw from p after a rejection): not lossless."""
    k = proposals.shape[0]
    accept_key, draw_key = split_key(key)
    px, qx = token_probs(p[:k], proposals), token_probs(q, proposals)
    u = mx.random.uniform(shape=(k,), key=accept_key)
    accepted = mx.sum(mx.cumprod((u * qx < px).astype(mx.int32)))
    draws = mx.random.categorical(mx.log(p), axis=-1, key=draw_key)
    return Verdict(accepted, draws[accepted], px, qx)


@pytest.mark.slow
def test_first_tokens_match_target_distribution(spread_pair):
    target, draft, tokenizer = spread_pair
    ids = tokenizer.encode(PROMPT)
    joint = _exact_joint(target, ids, SamplingParams(**PARAMS))
    pairs = _sample_pairs(target, draft, tokenizer, N)
    assert _p_value(pairs, joint) > 1e-3


@pytest.mark.slow
def test_restricted_draft_vocabulary_stays_lossless(spread_pair):
    """Proposals only from a small frequency-ranked set; verification over the full vocab."""
    target, draft, tokenizer = spread_pair
    ids = tokenizer.encode(PROMPT)
    joint = _exact_joint(target, ids, SamplingParams(**PARAMS))
    vocab = DraftVocab(vocab_size=target.lm_head.weight.shape[0], size=8)
    vocab.observe([x for pair in itertools.islice(joint, 3) for x in pair] * 5)
    pairs = _sample_pairs(target, draft, tokenizer, N, draft_vocab=vocab)
    assert _p_value(pairs, joint) > 1e-3


@pytest.mark.slow
def test_dropping_the_residual_fails_the_same_test(spread_pair, monkeypatch):
    import speclora.daemon.engine.speculative as speculative

    monkeypatch.setattr(speculative, "speculative_verdict", _broken_verdict)
    target, draft, tokenizer = spread_pair
    ids = tokenizer.encode(PROMPT)
    joint = _exact_joint(target, ids, SamplingParams(**PARAMS))
    pairs = _sample_pairs(target, draft, tokenizer, N)
    assert _p_value(pairs, joint) < 1e-4


def test_acceptance_beats_mlx_lm_rule(spread_pair):
    target, draft, tokenizer = spread_pair
    spec = SpeculationConfig()
    rates = {}
    for mode in ("detailed", "fast"):
        accepted = proposed = 0
        for seed in range(8):
            request = GenerationRequest(
                prompt=PROMPT, raw=True, max_tokens=20, draft_tokens=3, mode=mode,
                sampling=SamplingParams(temperature=1.0, seed=seed),
            )  # fmt: skip
            *_, summary = generate(target, draft, tokenizer, request, spec)
            accepted += summary.accepted
            proposed += summary.proposed
        rates[mode] = accepted / proposed
    assert rates["detailed"] >= 1.3 * rates["fast"], rates

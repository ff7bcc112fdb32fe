"""Proposals from sources other than the model draft (history), through the whole engine.

Whatever proposes the tokens, the output is the target's: token for token at T = 0, and
distributed as the target's at T > 0 (a history proposal is a point mass: accepted with
probability p(x), else resampled from p without x). The proposers here are deliberately
good, bad and adversarial, so the engine's rule is what is tested, not the proposer's luck.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import pytest
from speclora.daemon.engine import (
    GenerationRequest,
    SamplingParams,
    StepEvent,
    build_prompt_tokens,
    generate,
)
from speclora.daemon.engine.costs import StepPrices
from speclora.daemon.engine.sampling import point_mass_verdict, probabilities
from speclora.shared.config import SpeculationConfig
from test_engine import PROMPTS, references, run  # noqa: F401  (fixture)
from test_engine_distribution import _exact_joint, _p_value, spread_pair  # noqa: F401
from test_engine_helpers import chi_square_p_value, untied_loaded  # noqa: F401

SPEC = SpeculationConfig()
# A CPU-like price table: a pass over n + 1 tokens costs 1 + 0.05 n passes, a draft pass 0.3.
PRICES = StepPrices(verify=tuple(1.0 + 0.05 * n for n in range(65)), draft=0.3)


@dataclass(frozen=True)
class Offer:
    tokens: tuple[int, ...]
    confidence: tuple[float, ...]
    match_len: int = 4
    source: str = "history"


class ScriptedHistory:
    """Proposes the continuation of a known token sequence (the target's own output, so most
    proposals are right), corrupting each proposed token with probability `noise`."""

    def __init__(self, prompt: Sequence[int], script: Sequence[int], noise: float, seed: int = 0):
        self.n_prompt = len(prompt)
        self.script = list(script)
        self.seen: list[int] = []
        self.noise = noise
        self.rng = random.Random(seed)
        self.calls = 0

    def extend(self, tokens: Sequence[int]) -> None:
        self.seen.extend(tokens)

    def proposals(self, max_len: int, *, min_token_prob: float = 0.1, spec_factor: float = 1.0):
        self.calls += 1
        at = len(self.seen)
        if self.seen != self.script[:at]:  # diverged (T > 0): nothing to copy
            return []
        tokens = self.script[at : at + max_len]
        if not tokens:
            return []
        tokens = [t if self.rng.random() >= self.noise else self.rng.randrange(64) for t in tokens]
        return [Offer(tuple(tokens), tuple(1.0 for _ in tokens))]


class FixedHistory:
    """Proposes the same tokens whatever the context (adversarial), on every `every`-th call
    (the steps between are left to the model draft or the target)."""

    def __init__(self, tokens: Sequence[int], confidence: float = 1.0, every: int = 1):
        self.tokens = tuple(tokens)
        self.confidence = confidence
        self.every = every
        self.calls = 0

    def extend(self, tokens: Sequence[int]) -> None:
        pass

    def proposals(self, max_len: int, *, min_token_prob: float = 0.1, spec_factor: float = 1.0):
        self.calls += 1
        if self.calls % self.every:
            return []
        tokens = self.tokens[:max_len]
        return [Offer(tokens, tuple(self.confidence for _ in tokens))] if tokens else []


def _ids(tokenizer, prompt: str) -> list[int]:
    return build_prompt_tokens(tokenizer, GenerationRequest(prompt=prompt))


@pytest.mark.parametrize("noise", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("draft_name", ["none", "random", "self"])
def test_greedy_with_history_equals_target_only(untied_loaded, references, noise, draft_name):  # noqa: F811
    target, random_draft, self_draft, tokenizer = untied_loaded
    draft = {"none": None, "random": random_draft, "self": self_draft}[draft_name]
    for i, prompt in enumerate(PROMPTS):
        ids = _ids(tokenizer, prompt)
        history = ScriptedHistory(ids, references[prompt], noise, seed=i)
        request = GenerationRequest(prompt=prompt, max_tokens=33)
        events, summary = run(
            target, draft, tokenizer, request, prompt_tokens=ids, prices=PRICES, history=history
        )
        assert list(summary.completion_token_ids) == references[prompt][:33]
        traces = [e.trace for e in events if isinstance(e, StepEvent) and e.trace]
        assert summary.history_proposed == sum(t.k for t in traces if t.source == "history")
        assert summary.history_accepted == sum(summary.from_history)
        assert summary.draft_accepted == sum(summary.from_draft)
        assert summary.proposed == summary.history_proposed + summary.draft_proposed
        if noise == 0.0:
            # An exact copy is taken in long steps: far fewer passes than tokens.
            assert summary.history_accepted >= 10  # (after a 24-token shadow: 14 here)
            assert summary.target_passes <= summary.completion_tokens / 3
        if noise == 1.0:
            # Garbage stops being proposed once calibration has seen it.
            assert summary.history_proposed <= 12


def test_history_respects_max_tokens_stop_strings_and_eos(untied_loaded, references):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    prompt = PROMPTS[1]
    ids = _ids(tokenizer, prompt)
    ref = references[prompt]
    for max_tokens in (1, 2, 5, 17):
        history = ScriptedHistory(ids, ref, 0.0)
        request = GenerationRequest(prompt=prompt, max_tokens=max_tokens)
        _, summary = run(target, None, tokenizer, request, prompt_tokens=ids, history=history)
        assert list(summary.completion_token_ids) == ref[:max_tokens]
    # A stop string inside a long accepted history step ends the text exactly before it.
    text = tokenizer.decode(ref[:30])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        history = ScriptedHistory(ids, ref, 0.0)
        request = GenerationRequest(prompt=prompt, max_tokens=30, stop=(stop,))
        events, summary = run(
            target, self_draft, tokenizer, request, prompt_tokens=ids, history=history
        )
        out = "".join(e.chunk.text for e in events if isinstance(e, StepEvent) and e.chunk)
        assert summary.finish_reason == "stop_string"
        assert stop not in out and text.startswith(out)
    # EOS proposed by history mid-step: the completion ends at it, like the target's would.
    eos = next(iter(tokenizer.eos_token_ids))
    history = FixedHistory([ref[0], eos, ref[1]])
    request = GenerationRequest(prompt=prompt, max_tokens=10)
    _, summary = run(target, None, tokenizer, request, prompt_tokens=ids, history=history)
    assert list(summary.completion_token_ids) == ref[:10]
    assert summary.finish_reason == "length"


def test_fixed_k_and_k0_leave_history_out(untied_loaded, references):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    prompt = PROMPTS[0]
    ids = _ids(tokenizer, prompt)
    for k in (0, 3):
        history = ScriptedHistory(ids, references[prompt], 0.0)
        request = GenerationRequest(prompt=prompt, max_tokens=12, draft_tokens=k)
        _, summary = run(target, self_draft, tokenizer, request, prompt_tokens=ids, history=history)
        assert summary.history_proposed == 0 and history.calls == 0
        assert list(summary.completion_token_ids) == references[prompt][:12]


# ---------------------------------------------------------------------- T > 0


def test_point_mass_rule_is_distributed_as_p():
    """The rule alone, position by position: the emitted first token is distributed as p."""
    p = mx.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    counts = [0, 0, 0, 0]
    key = mx.random.key(7)
    n = 4000
    for _ in range(n):
        key, sub = mx.random.split(key)
        verdict = point_mass_verdict(p, mx.array([1], mx.uint32), sub)
        first = 1 if int(verdict.accepted.item()) == 1 else int(verdict.next_token.item())
        counts[first] += 1
    assert chi_square_p_value(counts, [n * v for v in p[0].tolist()])[0] > 1e-3


def _sample_pairs_with(target, draft, tokenizer, history_factory, n: int):
    """(first two tokens per seed, history proposals, draft proposals) over n seeded runs."""
    pairs, by_history, by_draft = [], 0, 0
    for seed in range(n):
        request = GenerationRequest(
            prompt="Hello", raw=True, max_tokens=3,
            sampling=SamplingParams(temperature=1.0, top_k=4, seed=seed),
        )  # fmt: skip
        *_, summary = generate(
            target, draft, tokenizer, request, SPEC, prices=PRICES, history=history_factory(seed)
        )
        pairs.append(tuple(summary.completion_token_ids[:2]))
        by_history += summary.history_proposed
        by_draft += summary.draft_proposed
    return pairs, by_history, by_draft


@pytest.mark.slow
@pytest.mark.parametrize("which", ["history", "mixed"])
def test_sampled_output_with_history_is_distributed_as_target(spread_pair, which):  # noqa: F811
    """First two tokens at T = 1 with top-k 4: history proposes the target's two most likely
    tokens (often accepted, sometimes not); 'mixed' also lets the model draft step in."""
    target, draft, tokenizer = spread_pair
    ids = tokenizer.encode("Hello")
    params = SamplingParams(temperature=1.0, top_k=4)
    joint = _exact_joint(target, ids, params)
    first = probabilities(target(mx.array([ids]))[0, -1], params).tolist()
    likely = sorted(range(len(first)), key=lambda t: -first[t])[:2]

    def factory(seed: int):
        # Alternate which tokens are proposed so both accept and reject paths are exercised.
        tokens = likely if seed % 2 == 0 else likely[::-1]
        return FixedHistory(tokens, confidence=0.9, every=2 if which == "mixed" else 1)

    pairs, by_history, by_draft = _sample_pairs_with(
        target, draft if which == "mixed" else None, tokenizer, factory, 1200
    )
    assert _p_value(pairs, joint) > 1e-3
    assert by_history > 300  # the rule under test was exercised ...
    assert (by_draft > 300) == (which == "mixed")  # ... beside the draft's, when mixed


class NowAndThenHistory(ScriptedHistory):
    """Right proposals on one call in three: plain steps in between."""

    def proposals(self, max_len: int, **kw):
        offers = super().proposals(max_len, **kw)
        return offers if self.calls % 3 == 0 else []


@pytest.mark.parametrize("draft_name", ["none", "self"])
def test_a_speculative_step_verifies_in_one_pass_even_right_after_a_plain_one(
    untied_loaded,  # noqa: F811
    references,  # noqa: F811
    draft_name,
    monkeypatch,
):
    """On a CPU a pass over seq[-1] and K proposals costs far less than a one-token pass and a
    second K-token pass, so no plain pass is queued ahead of a speculative step: each step's
    verify is one target pass of K + 1 tokens, and each plain step is one pass of 1."""
    from speclora.daemon.engine import events

    target, _, self_draft, tokenizer = untied_loaded
    draft = self_draft if draft_name == "self" else None
    widths: list[int] = []
    run_pass = events.ForwardPass.run

    def recorded(self):
        if self.model is target:
            widths.append(self.width)
        return run_pass(self)

    monkeypatch.setattr(events.ForwardPass, "run", recorded)
    prompt = PROMPTS[0]
    ids = _ids(tokenizer, prompt)
    history = NowAndThenHistory(ids, references[prompt], noise=0.0)
    request = GenerationRequest(prompt=prompt, max_tokens=40, draft_tokens=None)
    events_, summary = run(
        target, draft, tokenizer, request, prompt_tokens=ids, prices=PRICES, history=history
    )
    assert list(summary.completion_token_ids) == references[prompt][:40]
    traces = [e.trace for e in events_ if isinstance(e, StepEvent) and e.trace]
    decode = widths[len(widths) - len(traces) :]  # the passes after the prefill, one per step
    assert len(widths) - len(decode) <= 1 and len(decode) == len(traces)
    assert decode == [t.k + 1 for t in traces]
    after_plain = [b.k == 0 and t.k > 0 for b, t in zip(traces, traces[1:], strict=False)]
    assert any(after_plain)


class DoubtfulScript(ScriptedHistory):
    """The target's own continuation, offered at a confidence of 0.1: at its prior it never
    pays, so only its shadows can show it is right."""

    def proposals(self, max_len: int, **kw):
        return [
            Offer(o.tokens, (0.1,) * len(o.tokens), o.match_len)
            for o in super().proposals(max_len, **kw)
        ]


def test_history_offers_no_step_verifies_are_checked_against_the_targets_tokens(
    untied_loaded,  # noqa: F811
    references,  # noqa: F811
):
    """An offer that never pays is never verified (no probes: a useless history costs no
    pass), and one that is right is taken up once its shadow has matched the target."""
    target, _, _, tokenizer = untied_loaded
    prompt = PROMPTS[1]
    ids = _ids(tokenizer, prompt)
    request = GenerationRequest(prompt=prompt, max_tokens=40)
    garbage = FixedHistory(tuple(range(7, 31)), confidence=0.1)
    _, summary = run(target, None, tokenizer, request, prompt_tokens=ids, history=garbage)
    assert list(summary.completion_token_ids) == references[prompt][:40]
    assert garbage.calls > 30 and summary.history_proposed == 0
    right = DoubtfulScript(ids, references[prompt], noise=0.0)
    _, summary = run(target, None, tokenizer, request, prompt_tokens=ids, history=right)
    assert list(summary.completion_token_ids) == references[prompt][:40]
    assert summary.history_accepted >= 10  # (after a 24-token shadow: 14 here)

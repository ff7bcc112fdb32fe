"""The step controller against the best fixed choice, on simulated acceptance processes.

A draft or history source whose proposals are accepted by a known random process (iid, or
bursty: easy and hard stretches that switch as tokens are emitted), priced with a CPU-like
table. The adaptive controller must reach at least 0.95 of the best fixed K (or fixed history
length) chosen in hindsight, use a good source fully, and leave a useless one alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from speclora.daemon.engine.adaptive import make_policy
from speclora.daemon.engine.controller import (
    GRAMMAR_PRIOR,
    FixedPlans,
    HistoryMemory,
    StepController,
    StepPlan,
)
from speclora.daemon.engine.costs import StepPrices
from speclora.shared.config import SpeculationConfig

# A 2-core CPU with OpenBLAS: a pass over 2 tokens costs 1.25 passes, over 9 tokens 1.4.
CPU = (1.0, 1.25, 1.3, 1.33, 1.35, 1.37, 1.38, 1.39, 1.4) + tuple(
    1.4 + 0.01 * i for i in range(1, 60)
)
SPEC = SpeculationConfig()


class Process:
    """Per-position acceptance: `easy` or `hard`, switching with probability `switch` per
    emitted token (so acceptance is bursty, as on real text, when they differ)."""

    def __init__(self, easy: float, hard: float, switch: float, seed: int):
        self.rng = random.Random(seed)
        self.a = (easy, hard)
        self.switch = switch
        self.state = 0
        self._right: list[bool] = []

    def right(self, position: int) -> bool:
        """Whether a history's token at `position` of the output is the target's (the same
        bursty process, drawn per position, so an offer verified or not meets the same truth)."""
        while len(self._right) <= position:
            self._tick()
            self._right.append(self.rng.random() < self.a[self.state])
        return self._right[position]

    def token(self, position: int) -> int:
        """The target's token at `position`: history's (its id is the position) or another."""
        return position if self.right(position) else -1 - position

    def _tick(self) -> None:
        if self.rng.random() < self.switch:
            self.state = 1 - self.state

    def accept(self, k: int) -> int:
        accepted = 0
        while accepted < k:
            self._tick()
            if self.rng.random() >= self.a[self.state]:
                break
            accepted += 1
        self._tick()  # the target's own token
        return accepted


@dataclass(frozen=True)
class Offer:
    tokens: tuple[int, ...]
    confidence: tuple[float, ...]
    match_len: int
    source: str = "history"


class SimulatedHistory:
    """Always has a 24-token continuation of a 12-token match (a copied span): the token it
    proposes for each position of the output is that position (Process.token)."""

    def __init__(self) -> None:
        self.position = 0

    def extend(self, tokens) -> None:
        self.position += len(tokens)

    def proposals(self, max_len: int, *, min_token_prob: float = 0.1, spec_factor: float = 1.0):
        n = min(max_len, 24)
        tokens = tuple(range(self.position, self.position + n))
        return [Offer(tokens, (1.0,) * n, 12)] if n > 0 else []


class FixedHistoryLength:
    """Hindsight baseline: every step verifies exactly n history tokens."""

    def __init__(self, n: int):
        self.n = n

    def plan(self, budget: int) -> StepPlan:
        n = min(self.n, budget)
        return (
            StepPlan("history", n, tuple(range(n)), (1.0,) * n) if n > 0 else StepPlan("target", 0)
        )

    def update(self, plan, accepted, emitted=()) -> None:
        pass


def tokens_per_pass(
    controller, process: Process, prices: StepPrices, tokens: int = 3000, by_position=False
) -> float:
    """Tokens per unit of cost over `tokens` of output. `by_position`: proposals are a
    SimulatedHistory's, right where Process.right says, and the target's tokens are emitted
    (what decides a shadow); else a draft's, accepted as Process.accept draws."""
    n, cost = 0, 0.0
    history = getattr(controller, "history", None)
    while n < tokens:
        plan = controller.plan(tokens - n - 1)
        if by_position:
            accepted = 0
            while accepted < plan.k and process.right(n + accepted):
                accepted += 1
            emitted = [process.token(q) for q in range(n, n + accepted + 1)]
        else:
            accepted = process.accept(plan.k) if plan.k else process.accept(0)
            emitted = []
        if plan.source == "draft":
            cost += prices.draft_step(plan.k)
        else:
            cost += prices.verify_cost(plan.k)
        n += accepted + 1
        controller.update(plan, accepted, emitted)
        if history is not None:
            history.extend(emitted or [0] * (accepted + 1))
    return n / cost


def adaptive(prices: StepPrices, history=None, draft: bool = True) -> StepController:
    policy = make_policy(None, SPEC, prices.draft_steps(SPEC.adaptive_max)) if draft else None
    return StepController(prices, draft_policy=policy, history=history)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


PROCESSES = [
    (0.3, 0.3, 0.0),  # a poor draft
    (0.6, 0.6, 0.0),
    (0.8, 0.8, 0.0),
    (0.92, 0.92, 0.0),  # a good pre-trained draft
    (1.0, 1.0, 0.0),  # the target as its own draft
    (0.98, 0.5, 0.05),  # bursty: easy and hard stretches
    (0.99, 0.3, 0.1),
    (0.95, 0.6, 0.02),
]


@pytest.mark.parametrize("draft_cost", [0.13, 0.3])
@pytest.mark.parametrize("process", PROCESSES)
def test_adaptive_k_reaches_the_best_fixed_k(process, draft_cost):
    prices = StepPrices(CPU, draft_cost)
    seeds = range(3)
    fixed = {
        k: mean(tokens_per_pass(FixedPlans(k, True), Process(*process, s), prices) for s in seeds)
        for k in range(SPEC.adaptive_max + 1)
    }
    best = max(fixed.values())
    ours = mean(tokens_per_pass(adaptive(prices), Process(*process, s), prices) for s in seeds)
    assert ours >= 0.95 * best, (ours, fixed)


@pytest.mark.parametrize("a", [0.5, 0.8, 0.95])
def test_history_proposals_are_used_as_far_as_they_pay(a):
    prices = StepPrices(CPU, 0.3)
    fixed = {
        n: mean(
            tokens_per_pass(FixedHistoryLength(n), Process(a, a, 0, s), prices, by_position=True)
            for s in range(3)
        )
        for n in (0, 1, 2, 4, 8, 12, 16, 24)
    }
    best = max(fixed.values())
    ours = mean(
        tokens_per_pass(
            adaptive(prices, SimulatedHistory(), draft=False),
            Process(a, a, 0, s),
            prices,
            by_position=True,
        )
        for s in range(3)
    )
    assert ours >= 0.95 * best, (ours, fixed)


class CountingController(StepController):
    """Counts the history tokens it verifies, and at which output position it last did."""

    verified = 0
    last_verify = -1
    emitted = 0

    def update(self, plan, accepted, emitted=()):
        if plan.source == "history":
            self.verified += plan.k
            self.last_verify = self.emitted
        self.emitted += accepted + 1
        super().update(plan, accepted, emitted)


def test_a_useless_history_costs_almost_nothing():
    """Proposals that are never accepted: the controller stops verifying them after a few
    tries and never verifies one again (its shadows keep showing they fail, at no cost), and a
    later request remembers (HistoryMemory) and tries less."""
    prices = StepPrices(CPU, 0.3)
    memory = HistoryMemory()
    verified = []
    for seed in range(3):
        controller = CountingController(
            prices, history=SimulatedHistory(), calibration=memory.calibration()
        )
        ratio = tokens_per_pass(
            controller, Process(0.0, 0.0, 0, seed), prices, tokens=400, by_position=True
        )
        memory.record(controller.history_accepted, controller.history_tested)
        verified.append(controller.verified)
        assert ratio >= 0.95
        assert controller.last_verify < 20  # the opening tries, then never again
    assert verified[-1] <= verified[0]


class DoubtfulHistory(SimulatedHistory):
    """Its tokens come at a confidence of 0.2 (past text rarely continued that way)."""

    def proposals(self, max_len: int, *, min_token_prob: float = 0.1, spec_factor: float = 1.0):
        return [
            Offer(o.tokens, (0.2,) * len(o.tokens), o.match_len) for o in super().proposals(max_len)
        ]


def test_a_history_that_looked_useless_is_taken_up_once_its_shadows_match():
    """A history known to fail (the memory says so), at low confidence, that is now right 95%
    of the time: the offers nobody verifies are checked against the target's tokens, and
    within a few tokens it is verified and used, with no probe."""
    prices = StepPrices(CPU, 0.3)
    memory = HistoryMemory()
    useless = {o: [0.0] * len(bands) for o, bands in memory.calibration().items()}
    for _ in range(6):
        memory.record(useless, {o: [10.0] * len(b) for o, b in useless.items()})
    controller = CountingController(
        prices, history=DoubtfulHistory(), calibration=memory.calibration()
    )
    first = controller.plan(100)
    assert first.k == 0  # at its remembered calibration it does not pay
    controller.update(first, 0, [0])
    controller.history.extend([0])
    ratio = tokens_per_pass(
        controller, Process(0.95, 0.95, 0, 1), prices, tokens=400, by_position=True
    )
    assert ratio > 1.8
    assert controller.verified > 300


# A CPU's prices: a pass over w tokens costs about 1 + 0.08 (w - 1) passes.
LINEAR_CPU = StepPrices(verify=tuple(round(1 + 0.08 * n, 2) for n in range(65)), draft=0.2)


def test_prices_in_a_batch_are_what_a_step_adds_to_the_shared_forward():
    assert LINEAR_CPU.in_batch(0) is LINEAR_CPU
    shared = LINEAR_CPU.in_batch(20)  # the forward already carries 20 other tokens
    assert shared.verify[0] == 1.0
    for n in (1, 4, 16):  # each extra token is a smaller share of a wider pass
        assert shared.verify[n] < LINEAR_CPU.verify[n]
        want = LINEAR_CPU.verify_cost(20 + n) / LINEAR_CPU.verify_cost(20)
        assert shared.verify[n] == pytest.approx(want, abs=1e-4)
    assert shared.draft < LINEAR_CPU.draft


class _Lukewarm:
    """A history whose proposals are accepted at about 30%: not worth verifying alone on CPU
    prices, worth it as a small extra in a wide shared forward."""

    def extend(self, tokens) -> None:
        pass

    def proposals(self, max_len: int, *, min_token_prob: float = 0.1, spec_factor: float = 1.0):
        n = min(max_len, 4)
        return [Offer(tuple(range(n)), (0.35,) * n, 1)]


def test_a_request_in_a_wide_batch_speculates_where_alone_it_would_not():
    expensive = StepPrices(verify=tuple(round(1 + 0.5 * n, 2) for n in range(65)), draft=0.0)
    alone = StepController(expensive, history=_Lukewarm())
    assert alone.plan(100).k == 0
    batched = StepController(expensive, history=_Lukewarm())
    batched.price_for_batch(60)
    plan = batched.plan(100)
    assert plan.source == "history" and plan.k > 0
    batched.price_for_batch(0)  # alone again: alone's prices
    assert batched.plan(100).k == 0


class ScriptedGrammar:
    """A grammar source with a fixed answer: `forced` tokens, then a guessed split `guess` of
    the fixed bytes after them; every token is legal, and `end` is an end token it forces."""

    def __init__(self, forced=(), guess=(), end=None):
        self._forced, self._guess, self.end = tuple(forced), tuple(guess), end

    def forced(self, limit):
        return self._forced[:limit]

    def likely(self, forced, limit):
        return self._guess[:limit]

    def legal_prefix(self, tokens):
        return len(tokens)

    def free_end(self, tokens):
        return bool(tokens) and tokens[-1] == self.end


def test_a_forced_run_goes_on_with_the_guessed_split_each_priced_apart():
    prices = StepPrices(CPU, 0.3)
    controller = StepController(prices, grammar=ScriptedGrammar(forced=(1, 2, 3), guess=(4,)))
    plan = controller.plan(100)
    assert (plan.source, plan.tokens, plan.forced) == ("grammar", (1, 2, 3, 4), 3)
    # All four accepted: both estimates rise; the guess's from its own, lower prior.
    before = (controller.grammar_estimate.value, controller.guess_estimate.value)
    controller.update(plan, 4)
    assert controller.grammar_estimate.value > before[0]
    assert controller.guess_estimate.value > before[1]
    # The forced run rejected at its second token: the guess was never tested.
    controller = StepController(prices, grammar=ScriptedGrammar(forced=(1, 2, 3), guess=(4,)))
    guess = controller.guess_estimate.value
    controller.update(controller.plan(100), 1)
    assert controller.guess_estimate.value == pytest.approx(guess)
    assert controller.grammar_estimate.value < GRAMMAR_PRIOR


def test_guesses_that_are_rejected_stop_being_proposed():
    """A guess alone (no forced tokens before it) that the target always splits otherwise."""
    prices = StepPrices(CPU, 0.3)
    controller = StepController(prices, grammar=ScriptedGrammar(guess=(7,)))
    steps = []
    for _ in range(12):
        plan = controller.plan(100)
        steps.append(plan.k)
        controller.update(plan, 0)
    assert steps[0] == 1 and steps[-1] == 0, steps


def test_history_leaves_out_an_end_token_the_grammar_forces():
    prices = StepPrices(CPU, 0.3)

    class EndingHistory(SimulatedHistory):
        def proposals(self, max_len, *, min_token_prob=0.1, spec_factor=1.0):
            return [Offer((5, 6, 99), (1.0, 1.0, 1.0), 12)]

    controller = StepController(prices, history=EndingHistory(), grammar=ScriptedGrammar(end=99))
    plan = controller.plan(100)
    assert (plan.source, plan.tokens) == ("history", (5, 6))


class TwoOrigins:
    """A past request's match (first, as long) that is never accepted beside the request's own
    that always is: the two must be priced apart."""

    def extend(self, tokens) -> None:
        pass

    def proposals(self, max_len, *, min_token_prob=0.1, spec_factor=1.0):
        n = min(max_len, 8)
        return [
            Offer(tuple(range(n)), (1.0,) * n, 12, "history"),
            Offer(tuple(range(n)), (1.0,) * n, 12, "prompt"),
        ]


def test_each_origin_is_priced_by_its_own_acceptance():
    controller = StepController(StepPrices(CPU, 0.3), history=TwoOrigins())
    origins, accepted_tokens = [], 0
    for _ in range(40):
        plan = controller.plan(100)
        origins.append(plan.origin)
        accepted = plan.k if plan.origin == "prompt" else 0
        accepted_tokens += accepted
        controller.update(plan, accepted)
    assert origins[0] == "history"  # tried first: same match, same prior
    assert origins[-20:] == ["prompt"] * 20, origins  # the failing origin alone went quiet
    assert accepted_tokens >= 20 * 8
    memory = HistoryMemory()
    memory.record(controller.history_accepted, controller.history_tested)
    calibration = memory.calibration()
    assert calibration["history"][3] == 0.0 and calibration["prompt"][3] == 1.0

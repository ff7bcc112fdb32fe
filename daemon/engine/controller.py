"""One place that chooses, per step, who proposes and how much.

The sources: the model draft (K proposals for K draft passes), the history drafter (a suffix
match's continuation over the request's own tokens and past requests' outputs: no draft pass
at all), or nobody (K = 0, a plain target pass). Each candidate is scored as expected tokens
per unit of measured cost (costs.StepPrices: a wider verify is not free on a CPU), and the best
wins; a plain pass scores 1. A useless source therefore costs nothing but the occasional probe
(history's cost nothing at all, see below), and a good one is used as far as it pays.

Expected tokens. A model-draft step of k proposals at per-proposal acceptance a yields
(1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023), with a from adaptive K's estimate. A history
proposal comes with each token's empirical confidence c_i (how often past text continued that
way) and the length of the suffix match it continues; the step yields
1 + sum_i prod_{j <= i} a_j with a_j = min(A_MAX, f * c_j), where the calibration f
(acceptance per unit of confidence) is estimated per origin and match-length band from the
history steps seen, the same recent-vs-long-run way as the draft's a: a 2-token match is weak
evidence, a 16-token one is a copied span, and a match into past requests ("history") is not
as reliable as one of the same length in the request's own prompt and output ("prompt"): a
long match into a past request of the same template often continues with another input's
text. Both origins' proposals are priced each step and the better one is taken. A band's
long-run figure changes only when it is tested, so a band that proposed garbage stays quiet (its
recent evidence fades back to that figure between tests). An offer that is not verified is
still tested, for free: it is kept as a shadow and checked against the tokens the target emits
next, the same evidence its verify would have given (at T > 0 the target emits x with
probability p(x), the point mass's acceptance), so a good source that had bad luck comes back
without a probe and a useless one costs no pass at all (one shadow open at a time: successive
offers of one match would count the same tokens again). Each request starts from what earlier
ones saw (HistoryMemory), blended
with the band's default so that no band is shut for good. The history step takes the prefix of
the proposal with the best tokens per cost.

The request's grammar (structured output, engine/grammar.py) is a third source: where it allows
one token or a fixed run (a key name, a brace, a quote), it proposes that run with no draft pass,
priced like a history proposal at its own acceptance estimate (high: the run is what the grammar
forces, but the target may still spell it with other tokens). llguidance stops a forced run
where the token boundary becomes ambiguous (after `"key":`, the fixed ` "` could start a longer
token), so the run goes on with a guess: the canonical tokens of the fixed bytes left, priced
at a second, lower estimate (the target often merges the last of them with the free text
after it; the estimate learns how often not). It also prunes history's proposal to its legal
prefix before pricing it, less an end token the engine would emit with no pass; the draft's
proposals are masked in the engine.

Decisions depend only on the request's tokens, the acceptance seen and the fixed prices, never
on wall-clock time, so a seeded request makes the same choices every run. In a batch (several
requests' passes in one forward, engine/batch.py) a step is priced by what it adds to the
shared forward (`price_for_batch`); a seeded sampled request keeps its prices alone, so it
gives the same tokens alone and in a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from speclora.daemon.engine.adaptive import AcceptanceEstimate, AdaptiveK, KPolicy, expected_tokens
from speclora.daemon.engine.costs import StepPrices
from speclora.daemon.engine.events import Source

A_MAX = 0.98  # never price a history token as certain: past text is not the target
# Match-length bands (lower bounds) and each band's default calibration before any evidence:
# a token at confidence 1 continuing a match of that length is accepted this often.
MATCH_BANDS = (0, 3, 5, 9)
BAND_PRIORS = (0.3, 0.5, 0.7, 0.85)
ORIGINS = ("prompt", "history")  # the request's own tokens; past requests' (HistoryProposal)
GRAMMAR_PRIOR = 0.9  # a forced run's per-token acceptance before any evidence
GUESS_PRIOR = 0.6  # ... and that of a guessed split of the fixed bytes after it
MAX_FORCED = 32  # the longest forced run one step proposes


def match_band(match_len: int) -> int:
    return sum(match_len >= lo for lo in MATCH_BANDS[1:])


class Proposal(Protocol):
    tokens: tuple[int, ...]
    confidence: tuple[float, ...]
    match_len: int
    source: str  # one of ORIGINS


class ProposalSource(Protocol):
    """The history drafter as the controller sees it (engine.history.RequestHistory)."""

    def proposals(
        self, max_len: int, *, min_token_prob: float = ..., spec_factor: float = ...
    ) -> Sequence[Proposal]: ...

    def extend(self, tokens: Sequence[int]) -> None: ...


class GrammarSource(Protocol):
    """The request's grammar as the controller sees it (engine.grammar.GrammarState)."""

    def forced(self, limit: int) -> tuple[int, ...]: ...

    def likely(self, forced: Sequence[int], limit: int) -> tuple[int, ...]: ...

    def legal_prefix(self, tokens: Sequence[int]) -> int: ...

    def free_end(self, tokens: Sequence[int]) -> bool: ...


@dataclass(frozen=True)
class StepPlan:
    source: Source
    k: int  # proposals this step (0: a plain pass)
    tokens: tuple[int, ...] = ()  # history's proposals (the draft makes its own)
    confidence: tuple[float, ...] = ()
    probe: bool = False  # a model-draft step taken to re-test a draft that did not pay
    expected: float = 1.0  # the tokens it was expected to yield
    band: int = 0  # history: the match-length band it was priced in
    origin: str = ""  # history: the proposal's origin (ORIGINS)
    forced: int = 0  # grammar: how many leading tokens are forced (the rest are guessed)


PLAIN = StepPlan("target", 0)


@dataclass
class Shadow:
    """A history offer no step verified, checked against what the target emits instead."""

    tokens: tuple[int, ...]
    confidence: tuple[float, ...]
    origin: str
    band: int
    matched: int = 0

    def check(self, emitted: Sequence[int]) -> bool:
        """Compare the next emitted tokens; True once the offer is decided (a mismatch, or
        every token matched)."""
        for token in emitted:
            if token != self.tokens[self.matched]:
                return True
            self.matched += 1
            if self.matched == len(self.tokens):
                return True
        return False

    def evidence(self, decided: bool) -> tuple[int, float]:
        """(accepted, tested confidence), counted as a verify counts them; undecided (cut
        short by a verify of history itself): the matched tokens, with no failure seen."""
        failed = decided and self.matched < len(self.tokens)
        return self.matched, sum(self.confidence[: self.matched + failed])


Calibration = Mapping[str, Sequence[float | None]]  # origin -> per band (None: no evidence)


def _per_band() -> dict[str, list[float]]:
    return {origin: [0.0] * len(MATCH_BANDS) for origin in ORIGINS}


@dataclass
class HistoryMemory:
    """History's calibration per origin and match band across requests (one per target, kept
    by the worker), so a new request starts from what earlier ones saw. Seeded requests
    neither read nor feed it."""

    decay: float = 0.5
    _accepted: dict[str, list[float]] = field(default_factory=_per_band)
    _tested: dict[str, list[float]] = field(default_factory=_per_band)

    def calibration(self) -> dict[str, tuple[float | None, ...]]:
        return {
            origin: tuple(
                a / t if t >= 1.0 else None
                for a, t in zip(self._accepted[origin], self._tested[origin], strict=True)
            )
            for origin in ORIGINS
        }

    def record(
        self, accepted: Mapping[str, Sequence[float]], tested: Mapping[str, Sequence[float]]
    ) -> None:
        for origin in ORIGINS:
            for band in range(len(MATCH_BANDS)):
                old_a, old_t = self._accepted[origin][band], self._tested[origin][band]
                self._accepted[origin][band] = old_a * self.decay + accepted[origin][band]
                self._tested[origin][band] = old_t * self.decay + tested[origin][band]


def history_prefix(
    confidence: Sequence[float], calibration: float, prices: StepPrices
) -> tuple[int, float, float]:
    """(n, expected tokens, tokens per cost) of the best prefix of a history proposal; n = 0
    when no prefix beats a plain pass."""
    best_n, best_expected, best_gain = 0, 1.0, 1.0
    expected, run = 1.0, 1.0
    for n, c in enumerate(confidence, start=1):
        run *= min(A_MAX, calibration * c)
        expected += run
        gain = expected / prices.verify_cost(n)
        if gain > best_gain:
            best_n, best_expected, best_gain = n, expected, gain
    return best_n, best_expected, best_gain


class FixedPlans:
    """A request that fixed K: the model draft proposes exactly K (fewer near the end), and
    nothing else does; K = 0 is plain decoding."""

    def __init__(self, k: int, has_draft: bool) -> None:
        self.k = k if has_draft else 0

    def plan(self, budget: int) -> StepPlan:
        k = min(self.k, budget)
        return StepPlan("draft", k) if k > 0 else PLAIN

    def update(self, plan: StepPlan, accepted: int, emitted: Sequence[int] = ()) -> None:
        pass


class StepController:
    """Adaptive: the best of the model draft's K, history's proposal and a plain pass."""

    def __init__(
        self,
        prices: StepPrices,
        *,
        draft_policy: KPolicy | None = None,
        history: ProposalSource | None = None,
        max_history: int = 24,
        min_token_prob: float = 0.1,
        spec_factor: float = 1.0,
        calibration: Calibration | None = None,
        grammar: GrammarSource | None = None,
    ) -> None:
        self.prices = self.alone_prices = prices
        self._batch_prices: dict[int, StepPrices] = {}
        self.grammar = grammar
        self.grammar_estimate = AcceptanceEstimate(prior=GRAMMAR_PRIOR, shrink=2.0)
        self.guess_estimate = AcceptanceEstimate(prior=GUESS_PRIOR, shrink=2.0)
        self.draft_policy = draft_policy
        self.history = history
        self.max_history = max_history
        self.min_token_prob = min_token_prob
        self.spec_factor = spec_factor
        calibration = calibration or {}
        self.bands = {
            origin: [
                AcceptanceEstimate(
                    prior=default if old is None else (default + old) / 2, shrink=2.0
                )
                for default, old in zip(
                    BAND_PRIORS, calibration.get(origin, (None,) * len(MATCH_BANDS)), strict=True
                )
            ]
            for origin in ORIGINS
        }
        # What this request's history steps yielded per origin and band, against the
        # confidence of the positions they tested (for HistoryMemory).
        self.history_accepted = _per_band()
        self.history_tested = _per_band()
        self._offer: Shadow | None = None  # this step's best history offer, paying or not
        self.shadow: Shadow | None = None  # an offer not verified, checked as tokens come

    def price_for_batch(self, others: int) -> None:
        """Price the next steps as a row of a shared forward that carries `others` tokens of
        other requests (0: alone; see StepPrices.in_batch)."""
        if others not in self._batch_prices:
            if len(self._batch_prices) > 64:
                self._batch_prices.clear()
            self._batch_prices[others] = self.alone_prices.in_batch(others)
        self.prices = self._batch_prices[others]
        if isinstance(self.draft_policy, AdaptiveK):
            self.draft_policy.step_costs = self.prices.draft_steps(self.draft_policy.max_k)

    def _draft_plan(self, budget: int) -> StepPlan:
        policy = self.draft_policy
        if policy is None:
            return PLAIN
        k = min(policy.next_k(), budget)
        if k <= 0:
            return PLAIN
        if isinstance(policy, AdaptiveK):
            a = policy.alpha
            expected = expected_tokens(a, k)
            probe = policy.gain(a, k) < 1.0
        else:
            expected, probe = 1.0, False
        return StepPlan("draft", k, probe=probe, expected=expected)

    def _history_plan(self, budget: int) -> StepPlan:
        """The best-priced prefix of the history's proposals (one per origin); PLAIN when no
        prefix pays (the best offer is still kept in `_offer`, for a shadow)."""
        self._offer = None
        if self.history is None or budget <= 0:
            return PLAIN
        offers = self.history.proposals(
            min(self.max_history, budget),
            min_token_prob=self.min_token_prob,
            spec_factor=self.spec_factor,
        )
        best = PLAIN
        best_gain = 0.0
        for offer in offers:
            tokens, confidence = self._legal(tuple(offer.tokens), tuple(offer.confidence))
            if not tokens:
                continue
            origin, band = offer.source, match_band(offer.match_len)
            n, expected, gain = history_prefix(
                confidence, self.bands[origin][band].value, self.prices
            )
            if self._offer is None or gain > best_gain:
                best_gain = gain
                self._offer = Shadow(tokens, confidence, origin, band)
                best = StepPlan(
                    "history",
                    n,
                    tokens=tokens[:n],
                    confidence=confidence[:n],
                    expected=expected,
                    band=band,
                    origin=origin,
                )
        return best if best.k else PLAIN

    def _legal(
        self, tokens: tuple[int, ...], confidence: tuple[float, ...]
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """A proposal cut to what the request's grammar allows (only that can be accepted)."""
        if self.grammar is None:
            return tokens, confidence
        legal = self.grammar.legal_prefix(tokens)
        if legal and self.grammar.free_end(tokens[:legal]):
            legal -= 1  # the engine emits that end token with no pass: not worth a row
        return tokens[:legal], confidence[:legal]

    def _grammar_plan(self, budget: int) -> StepPlan:
        """The grammar's forced run, then a guessed split of the fixed bytes after it (a
        string's opening quote after a key, an item's after a comma: the bytes are certain,
        how the target tokenizes them is not), each priced at its own acceptance estimate."""
        if self.grammar is None or budget <= 0:
            return PLAIN
        limit = min(MAX_FORCED, budget)
        forced = self.grammar.forced(limit)
        guess = self.grammar.likely(forced, limit - len(forced))
        tokens = forced + guess
        if not tokens:
            return PLAIN
        rates = (min(A_MAX, self.grammar_estimate.value),) * len(forced) + (
            min(A_MAX, self.guess_estimate.value),
        ) * len(guess)
        n, expected, _ = history_prefix(rates, 1.0, self.prices)
        if n == 0:
            return PLAIN
        return StepPlan(
            "grammar",
            n,
            tokens=tokens[:n],
            confidence=(1.0,) * n,
            expected=expected,
            forced=min(n, len(forced)),
        )

    def _gain(self, plan: StepPlan) -> float:
        if plan.source == "draft":
            return plan.expected / self.prices.draft_step(plan.k)
        if plan.source in ("history", "grammar"):
            return plan.expected / self.prices.verify_cost(plan.k)
        return 1.0

    def plan(self, budget: int) -> StepPlan:
        """The step to take; `budget` = proposals the request can still use (tokens left - 1).
        A history offer it does not verify becomes the shadow, unless one is open."""
        plan = self._choose(budget)
        if plan.source != "history" and self.shadow is None and self._offer is not None:
            self.shadow = self._offer
        return plan

    def _choose(self, budget: int) -> StepPlan:
        grammar = self._grammar_plan(budget)
        if grammar.k:
            # A forced run is the cheapest proposal there is; it wins unless a source prices
            # higher (a long history match can continue past it). A guess alone is weaker
            # evidence: then the draft competes too.
            candidates = [self._history_plan(budget)]
            if not grammar.forced:
                candidates.append(self._draft_plan(budget))
            others = [p for p in candidates if p.k and not p.probe]  # (a draft's probe)
            best = max(others, key=self._gain, default=None)
            if best is not None and self._gain(best) > self._gain(grammar):
                return best
            return grammar
        draft = self._draft_plan(budget)
        history = self._history_plan(budget)
        if history.k and self._gain(history) > max(self._gain(draft), 1.0):
            return history
        if draft.k and (draft.probe or self._gain(draft) >= 1.0):
            return draft
        return PLAIN

    def update(self, plan: StepPlan, accepted: int, emitted: Sequence[int] = ()) -> None:
        """What the step did: `accepted` of its proposals, `emitted` the target's tokens (which
        decide the shadow, if one is open)."""
        if self.draft_policy is not None:
            # A history step did not test the draft: for adaptive K it is an idle step.
            self.draft_policy.update(plan.k if plan.source == "draft" else 0, accepted)
        if plan.source == "grammar":
            # The forced part is tested first; the guessed part only once it was all accepted.
            f = plan.forced
            self.grammar_estimate.decay()
            if f:
                self.grammar_estimate.observe(min(accepted, f), min(accepted + 1, f))
            self.guess_estimate.decay()
            if plan.k > f and accepted >= f:
                self.guess_estimate.observe(accepted - f, accepted - f + (accepted < plan.k))
        else:
            self.grammar_estimate.fade()
            self.guess_estimate.fade()
        tests: list[tuple[str, int, int, float]] = []  # (origin, band, accepted, tested)
        if plan.source == "history":
            # Tested positions: the accepted ones and the first rejected one, if any.
            tested = sum(plan.confidence[: accepted + (1 if accepted < plan.k else 0)])
            tests.append((plan.origin, plan.band, accepted, tested))
        shadow = self.shadow
        if shadow is not None:
            decided = plan.source != "history" and shadow.check(emitted)
            if decided or plan.source == "history":  # (a verify of history supersedes it)
                self.shadow = None
                if decided or shadow.matched:
                    tests.append((shadow.origin, shadow.band, *shadow.evidence(decided)))
        tested_bands = {(origin, band) for origin, band, _, _ in tests}
        for origin, estimates in self.bands.items():
            for band, estimate in enumerate(estimates):
                if (origin, band) in tested_bands:
                    estimate.decay()
                else:
                    estimate.fade()
        for origin, band, n, tested in tests:
            self.bands[origin][band].observe(n, tested)
            self.history_accepted[origin][band] += n
            self.history_tested[origin][band] += tested


def make_controller(
    draft_tokens: int | None,
    spec: object,
    prices: StepPrices,
    *,
    has_draft: bool,
    history: ProposalSource | None,
    draft_alpha: float | None,
    history_calibration: Calibration | None,
    history_config: object | None = None,
    grammar: GrammarSource | None = None,
) -> FixedPlans | StepController:
    """Fixed K when the request (or config) sets one, else the adaptive controller."""
    from speclora.daemon.engine.adaptive import make_policy

    if draft_tokens is not None:
        return FixedPlans(draft_tokens, has_draft)
    policy = (
        make_policy(None, spec, prices.draft_steps(spec.adaptive_max), draft_alpha)  # type: ignore[attr-defined]
        if has_draft
        else None
    )
    options = {}
    if history_config is not None:
        options = dict(
            max_history=history_config.max_proposal,  # type: ignore[attr-defined]
            min_token_prob=history_config.min_token_prob,  # type: ignore[attr-defined]
            spec_factor=history_config.spec_factor,  # type: ignore[attr-defined]
        )
    return StepController(
        prices,
        draft_policy=policy,
        history=history,
        calibration=history_calibration,
        grammar=grammar,
        **options,
    )

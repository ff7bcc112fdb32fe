"""What a step costs on this machine, in one-token target passes, measured once at load.

A speculative step is priced as its proposer's work plus one target pass over the proposals and
the token before them. On a GPU a pass over a few tokens costs about one pass; on a CPU it does
not (OpenBLAS on a 2-core Xeon: 2 tokens ~1.25 passes, 5 tokens ~1.35, 8 tokens ~1.4), and the
price does not grow evenly, so the controller keeps a measured price per width instead of one
ratio. A model-draft step with k proposals also pays k draft passes; a history proposal pays
nothing but the wider verify.

Figures are rounded and never fall as the width grows, so restarts make the same choices and a
noisy reading cannot favour long steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_COST_RATIO = 0.4  # a drafted token's price in target passes when nothing was measured
DEFAULT_VERIFY_SLOPE = 0.05  # a verified token's price when nothing was measured (a CPU's ~)
# Widths measured beyond the dense range, interpolated between (long history proposals).
_SPARSE_WIDTHS = (13, 17, 25, 33, 49, 65)

StepCosts = tuple[float, ...]  # [k] = a draft step with k proposals, in target passes; [0] = 1.0


@dataclass(frozen=True)
class StepPrices:
    """verify[n] = a target pass over n + 1 tokens; draft = one draft pass (0 = no draft)."""

    verify: tuple[float, ...]
    draft: float

    def verify_cost(self, n: int) -> float:
        """A step that verifies n proposals (n = 0: a plain pass)."""
        if n < len(self.verify):
            return self.verify[n]
        # Past the measured widths: extend the last measured slope.
        last = len(self.verify) - 1
        slope = self.verify[last] - self.verify[last - 1] if last > 0 else DEFAULT_VERIFY_SLOPE
        return self.verify[last] + (n - last) * max(slope, 0.0)

    def draft_step(self, k: int) -> float:
        return k * self.draft + self.verify_cost(k)

    def in_batch(self, others: int) -> StepPrices:
        """The prices a request sees when the round's target forward also carries `others`
        tokens of other requests: what its step adds to that forward's time, over a plain
        step's share (a pass over others + n + 1 tokens, over one over others + 1). Wider steps
        get cheaper as the batch grows, as long as a wider pass costs less than its width."""
        if others <= 0:
            return self
        base = self.verify_cost(others)
        verify = tuple(
            round(self.verify_cost(others + n) / base, 4) for n in range(len(self.verify))
        )
        return StepPrices(verify=verify, draft=round(self.draft / base, 4))

    def draft_steps(self, max_k: int) -> StepCosts:
        """The model draft's price table, as adaptive K reads it."""
        return tuple(round(self.draft_step(k), 4) for k in range(max_k + 1))


def default_prices(cost_ratio: float = DEFAULT_COST_RATIO, max_n: int = 64) -> StepPrices:
    """Leviathan's cost model (a wide pass costs one pass) plus a small verify slope."""
    verify = tuple(round(1.0 + n * DEFAULT_VERIFY_SLOPE, 4) for n in range(max_n + 1))
    return StepPrices(verify=verify, draft=cost_ratio)


def linear_step_costs(cost_ratio: float, max_k: int = 16) -> StepCosts:
    """Leviathan's cost model: each proposal adds `cost_ratio` of a target pass."""
    return tuple(1.0 + k * cost_ratio for k in range(max_k + 1))


def _relative(
    target: Any, widths: Sequence[int], repeats: int, draft: Any = None, fn: Any = None
) -> list[float]:
    """Each measured forward's time over a one-token target pass timed right beside it, the
    median over `repeats` rounds. A ratio of neighbours, not of best times: on a machine that
    other work shares, a burst of load hits both halves of a pair alike, and the median drops
    the pairs it split. Widths are target passes; with `draft`/`fn`, one draft pass instead."""
    import statistics

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    caches = {id(target): make_prompt_cache(target)}
    if draft is not None:
        caches[id(draft)] = make_prompt_cache(draft)
    for model in {id(target): target, id(draft): draft}.values():
        if model is not None:
            mx.eval(model(mx.zeros((1, 32), mx.uint32), cache=caches[id(model)]))

    def seconds(model: Any, width: int, call: Any = None) -> float:
        cache = caches[id(model)]
        x = mx.zeros((width,), mx.uint32)
        start = time.perf_counter()
        mx.eval(call(x, cache) if call else model(x[None], cache=cache))
        took = time.perf_counter() - start
        for c in cache:
            c.trim(width)
        return took

    ratios: list[list[float]] = [[] for _ in widths]
    for _ in range(repeats):
        for i, width in enumerate(widths):
            one = seconds(target, 1)
            took = seconds(draft, 1, fn) if draft is not None else seconds(target, width)
            ratios[i].append(took / one)
    return [statistics.median(r) for r in ratios]


def measure_prices(
    target: Any,
    draft: Any | None,
    *,
    max_k: int = 8,
    max_verify: int = 8,
    repeats: int = 3,
    draft_vocab: Any | None = None,
) -> StepPrices:
    """Time target passes over 1..max(max_k, 8) + 1 tokens densely and wider ones up to
    max_verify + 1 sparsely (linearly interpolated), and one draft pass with the head
    generation uses (`draft_vocab`), all relative to a one-token target pass. A pass over w
    tokens is priced at most w passes (what w separate passes cost), whatever a noisy reading
    says."""
    dense = max(max_k, 8) + 1
    widths = list(range(2, dense + 1)) + [w for w in _SPARSE_WIDTHS if dense < w <= max_verify + 1]
    if max_verify + 1 > widths[-1]:
        widths.append(max_verify + 1)
    measured = {1: 1.0, **dict(zip(widths, _relative(target, widths, repeats), strict=True))}
    points = sorted(measured)
    verify = [1.0]
    for width in range(2, points[-1] + 1):
        if width in measured:
            r = measured[width]
        else:  # between two sparse widths
            lo = max(w for w in points if w < width)
            hi = min(w for w in points if w > width)
            r = measured[lo] + (measured[hi] - measured[lo]) * (width - lo) / (hi - lo)
        verify.append(round(max(min(r, float(width)), verify[-1] + 0.01), 2))
    draft_cost = 0.0
    if draft is not None:
        draft_cost = _draft_cost(target, draft, draft_vocab, repeats)
    return StepPrices(verify=tuple(verify), draft=draft_cost)


def _draft_cost(target: Any, draft: Any, draft_vocab: Any | None, repeats: int) -> float:
    """One draft pass (with the head generation uses) in one-token target passes."""
    from speclora.daemon.engine.draft_vocab import DraftHead, model_parts

    head = DraftHead(model_parts(draft), draft_vocab)
    (ratio,) = _relative(target, [1], repeats, draft, lambda x, cache: head.logits(x, cache)[1])
    return round(ratio, 3)


def with_draft_head(
    prices: StepPrices, target: Any, draft: Any, draft_vocab: Any | None, repeats: int = 3
) -> StepPrices:
    """The same verify prices with another draft head's pass (e.g. the full head beside the
    restricted one)."""
    return StepPrices(prices.verify, _draft_cost(target, draft, draft_vocab, repeats))


def measure_step_costs(
    target: Any, draft: Any, max_k: int = 8, repeats: int = 3, draft_vocab: Any | None = None
) -> StepCosts:
    """The model draft's price table alone: (k draft passes + one target pass over k + 1
    tokens) / one target pass over 1 token, k = 0..max_k."""
    prices = measure_prices(
        target, draft, max_k=max_k, max_verify=max_k, repeats=repeats, draft_vocab=draft_vocab
    )
    costs = [1.0]
    for k in range(1, max_k + 1):
        costs.append(max(round(prices.draft_step(k), 2), costs[-1] + 0.01))
    return tuple(costs)

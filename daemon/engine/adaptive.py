"""Choosing the draft length K per step from the running acceptance.

With per-proposal acceptance a, a step with K proposals yields (1 - a^(K+1)) / (1 - a) tokens
(Leviathan et al. 2023) and costs `step_costs[K]` target passes: K draft passes plus one target
pass over K + 1 tokens, measured on this machine at load (measure_step_costs). On a CPU the wide
pass is not free, and its price does not grow evenly with K (OpenBLAS on a 2-core Xeon: 2 tokens
cost ~1.25 passes, 5 tokens ~1.35, 8 tokens ~1.4), so the controller keeps a price per K instead
of one ratio. It picks the K with the most tokens per pass, or K = 0 (plain target decoding) when
no K beats 1.

Estimating a. Recent steps' evidence (decaying, ~5 steps) is shrunk toward the long-run
acceptance (~30 steps, plus what earlier requests saw: AcceptanceMemory). Recent
evidence also decays during plain steps, so after an unlucky run of rejections the estimate
drifts back to the long-run figure and a draft that is good on the whole resumes within a few
tokens, instead of waiting for a lucky probe. When even the long-run figure says no K pays, the
controller probes now and then with one proposal, backing off while probes keep failing, so a
draft that improves (a new adapter) is noticed and a useless one costs ~nothing.

Decisions depend only on the acceptance history and the fixed step costs, never on wall-clock
timings, so a seeded request makes the same choices, and the same output, every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from speclora.daemon.engine.costs import (
    DEFAULT_COST_RATIO,
    StepCosts,
    linear_step_costs,
    measure_step_costs,
)

__all__ = [
    "AcceptanceEstimate",
    "AcceptanceMemory",
    "AdaptiveK",
    "FixedK",
    "KPolicy",
    "expected_tokens",
    "linear_step_costs",
    "make_policy",
    "measure_step_costs",
    "speedup_bound",
]

MAX_PROBE_BACKOFF = 8


class KPolicy(Protocol):
    def next_k(self) -> int: ...
    def update(self, k: int, accepted: int) -> None: ...


@dataclass
class FixedK:
    k: int

    def next_k(self) -> int:
        return self.k

    def update(self, k: int, accepted: int) -> None:
        pass


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens from one step with k proposals at per-proposal acceptance alpha."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def speedup_bound(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan's expected speedup over plain decoding: tokens per step / cost per step."""
    return expected_tokens(alpha, k) / (1.0 + k * cost_ratio)


@dataclass
class AcceptanceEstimate:
    """A per-proposal acceptance estimate: recent evidence (decaying fast) shrunk toward a
    long-run figure (decaying slowly, starting from a weak prior). `decay()` once per step,
    then `observe()` what the step showed; steps that test nothing only decay."""

    memory: float = 0.8  # per-step decay of the recent evidence (~5 steps)
    long_memory: float = 0.97  # per-step decay of the long-run evidence (~30 steps)
    shrink: float = 2.0  # the long-run figure's weight against recent evidence, in trials
    prior: float = 0.5  # before any evidence: a weak a = 0.5 ...
    prior_weight: float = 1.0  # ... worth one trial
    _successes: float = field(default=0.0, init=False)
    _trials: float = field(default=0.0, init=False)
    _long_successes: float = field(default=0.0, init=False)
    _long_trials: float = field(default=0.0, init=False)

    @property
    def long_run(self) -> float:
        weight = self.prior_weight
        return (self._long_successes + weight * self.prior) / (self._long_trials + weight)

    @property
    def value(self) -> float:
        return (self._successes + self.shrink * self.long_run) / (self._trials + self.shrink)

    def decay(self) -> None:
        self._successes *= self.memory
        self._trials *= self.memory
        self._long_successes *= self.long_memory
        self._long_trials *= self.long_memory

    def fade(self) -> None:
        """A step that tested nothing: recent evidence fades toward the long-run figure."""
        self._successes *= self.memory
        self._trials *= self.memory

    def observe(self, successes: float, trials: float) -> None:
        self._successes += successes
        self._trials += trials
        self._long_successes += successes
        self._long_trials += trials


@dataclass
class AdaptiveK:
    """Per-request K controller (see module docstring). `next_k()` is side-effect free, so the
    engine may ask ahead (to pipeline plain steps); `update()` records what a step did."""

    min_k: int = 0
    max_k: int = 8
    start_k: int = 4
    probe_interval: int = 16
    step_costs: StepCosts = field(default_factory=lambda: linear_step_costs(DEFAULT_COST_RATIO))
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    _steps: int = field(default=0, init=False)
    _idle: int = field(default=0, init=False)  # plain steps since the last speculative one
    _backoff: int = field(default=1, init=False)

    @property
    def long_run_alpha(self) -> float:
        return self.estimate.long_run

    @property
    def alpha(self) -> float:
        return self.estimate.value

    def gain(self, alpha: float, k: int) -> float:
        """Expected tokens per target pass with k proposals."""
        return expected_tokens(alpha, k) / self.step_costs[min(k, len(self.step_costs) - 1)]

    def best_k(self) -> int:
        """The K >= max(1, min_k) with the best expected gain, or 0 if none beats 1."""
        lo = max(1, self.min_k)
        if lo > self.max_k:
            return self.min_k
        a = self.alpha
        best = max(range(lo, self.max_k + 1), key=lambda k: self.gain(a, k))
        if self.min_k == 0 and self.gain(a, best) < 1.0:
            return 0
        return best

    def seed_from(self, alpha: float, weight: float = 4.0) -> None:
        """Start from what earlier requests saw (AcceptanceMemory) instead of `start_k`: their
        acceptance becomes the long-run prior. A draft known to be useless opens with a
        one-token probe instead of a K = start_k step: ~1/4 of the cost, and every request
        still tests the draft, so a short request is still recorded as a failure case (the
        learning loop needs them) and a better adapter shows."""
        self.estimate.prior, self.estimate.prior_weight = alpha, weight
        self._steps = max(self._steps, 1)
        self._idle = self.probe_interval * self._backoff  # due: best_k() = 0 means a probe

    def next_k(self) -> int:
        if self._steps == 0:
            return min(max(self.start_k, self.min_k), self.max_k)
        k = self.best_k()
        if k == 0 and self._idle >= self.probe_interval * self._backoff:
            return 1  # a probe: the cheapest look at whether the draft got better
        return k

    def update(self, k: int, accepted: int) -> None:
        self._steps += 1
        self.estimate.decay()
        if k == 0:
            self._idle += 1
            return
        was_idle = self._idle > 0
        self._idle = 0
        # A step shows `accepted` successes and, if it stopped early, one failure; later
        # proposals were never tested (geometric counting, unbiased for a).
        self.estimate.observe(accepted, accepted + (1 if accepted < k else 0))
        if was_idle:
            # A probe: if it does not lift K above 0, wait longer before the next one.
            if self.best_k() == 0:
                self._backoff = min(self._backoff * 2, MAX_PROBE_BACKOFF)
            else:
                self._backoff = 1


@dataclass
class AcceptanceMemory:
    """Per-position acceptance across requests, for the worker to keep per draft.

    The engine reads it when an adaptive request starts and adds the request's evidence when
    it ends. Evidence decays per request, so a swapped-in adapter is believed within a few
    requests (call `reset()` on a swap to forget at once). Seeded requests neither read nor
    depend on it, so their output is a function of the request alone.
    """

    decay: float = 0.5
    _accepts: float = field(default=0.0, init=False)
    _trials: float = field(default=0.0, init=False)

    @property
    def alpha(self) -> float | None:
        return self._accepts / self._trials if self._trials >= 1.0 else None

    def record(self, accepted: int, rejections: int) -> None:
        self._accepts = self._accepts * self.decay + accepted
        self._trials = self._trials * self.decay + accepted + rejections

    def reset(self) -> None:
        self._accepts = self._trials = 0.0


def make_policy(
    draft_tokens: int | None,
    spec: Any,
    step_costs: Sequence[float] | None = None,
    prior_alpha: float | None = None,
) -> KPolicy:
    """Fixed K when the request sets one, else the adaptive controller from the config,
    started from `prior_alpha` when earlier requests measured one."""
    if draft_tokens is not None:
        return FixedK(draft_tokens)
    policy = AdaptiveK(
        min_k=spec.adaptive_min,
        max_k=spec.adaptive_max,
        start_k=spec.adaptive_start,
        probe_interval=spec.probe_interval,
        step_costs=tuple(step_costs) if step_costs else linear_step_costs(DEFAULT_COST_RATIO),
    )
    if prior_alpha is not None:
        policy.seed_from(prior_alpha)
    return policy

"""Choosing the draft length K per step from the running acceptance.

With per-proposal acceptance a and a draft token costing `cost_ratio` target passes (the draft
pass plus the wider verification), a step with K proposals yields (1 - a^(K+1)) / (1 - a)
tokens for 1 + K * cost_ratio passes (Leviathan et al. 2023). The controller estimates a from
recent steps and picks the K with the best ratio, or K = 0 (plain target decoding) when no K
beats 1. At K = 0 it probes now and then with one proposal, backing off while probes keep
failing, so a draft that improves (a new adapter) is noticed and a useless one costs ~nothing.

Decisions depend only on the acceptance history and the fixed cost ratio, never on wall-clock
timings, so a seeded request makes the same choices, and the same output, every run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_COST_RATIO = 0.4  # SmolLM2-135M target, self:4 draft, OpenBLAS: (19 + ~7) / 57 ms
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
class AdaptiveK:
    """Per-request K controller (see module docstring). `next_k()` is side-effect free, so the
    engine may ask ahead (to pipeline plain steps); `update()` records what a step did."""

    min_k: int = 0
    max_k: int = 8
    start_k: int = 4
    probe_interval: int = 16
    cost_ratio: float = DEFAULT_COST_RATIO
    memory: float = 0.8  # per-step decay of the acceptance evidence (~5 steps of memory)
    prior_accepts: float = 0.5  # a weak prior of a = 0.5, worth one proposal
    prior_trials: float = 1.0
    _accepts: float = field(default=0.0, init=False)
    _trials: float = field(default=0.0, init=False)
    _steps: int = field(default=0, init=False)
    _idle: int = field(default=0, init=False)  # plain steps since the last speculative one
    _backoff: int = field(default=1, init=False)
    _probing: bool = field(default=False, init=False)

    @property
    def alpha(self) -> float:
        return (self._accepts + self.prior_accepts) / (self._trials + self.prior_trials)

    def best_k(self) -> int:
        """The K >= max(1, min_k) with the best expected speedup, or 0 if none beats 1."""
        lo = max(1, self.min_k)
        if lo > self.max_k:
            return self.min_k
        a = self.alpha
        best = max(range(lo, self.max_k + 1), key=lambda k: speedup_bound(a, k, self.cost_ratio))
        if self.min_k == 0 and speedup_bound(a, best, self.cost_ratio) < 1.0:
            return 0
        return best

    def seed_from(self, alpha: float, weight: float = 4.0) -> None:
        """Start from what earlier requests saw (AcceptanceMemory) instead of `start_k`. A
        draft known to be useless opens with a one-token probe instead of a K = start_k step:
        ~1/4 of the cost, and every request still tests the draft, so a short request is still
        recorded as a failure case (the learning loop needs them) and a better adapter shows."""
        self._accepts = alpha * weight
        self._trials = weight
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
        if k == 0:
            self._idle += 1
            return
        was_idle = self._idle > 0
        self._idle = 0
        # A step shows `accepted` successes and, if it stopped early, one failure; later
        # proposals were never tested (geometric counting, unbiased for a).
        self._accepts = self._accepts * self.memory + accepted
        self._trials = self._trials * self.memory + accepted + (1 if accepted < k else 0)
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
    cost_ratio: float | None = None,
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
        cost_ratio=DEFAULT_COST_RATIO if cost_ratio is None else cost_ratio,
    )
    if prior_alpha is not None:
        policy.seed_from(prior_alpha)
    return policy


def measure_cost_ratio(
    target: Any, draft: Any, k: int = 4, repeats: int = 5, draft_vocab: Any | None = None
) -> float:
    """Measure the cost of one drafted token in target passes on this machine.

    (draft pass + extra verification width per token) / one target pass, from short timed
    forwards over fresh caches; with `draft_vocab` the draft pass uses the restricted head, as
    generation will. The worker calls this once at load and passes the result to
    `generate(cost_ratio=...)`; it is rounded so restarts make the same K choices.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from speclora.daemon.engine.draft_vocab import DraftHead, model_parts

    def timed(model: Any, width: int, fn: Any = None) -> float:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.zeros((1, 32), mx.uint32), cache=cache))
        best = float("inf")
        for _ in range(repeats):
            x = mx.zeros((width,), mx.uint32)
            start = time.perf_counter()
            mx.eval(fn(x, cache) if fn else model(x[None], cache=cache))
            best = min(best, time.perf_counter() - start)
            for c in cache:
                c.trim(width)
        return best

    one = timed(target, 1)
    wide = timed(target, k + 1)
    head = DraftHead(model_parts(draft), draft_vocab)
    draft_one = timed(draft, 1, lambda x, cache: head.logits(x, cache)[1])
    ratio = (draft_one + (wide - one) / k) / one
    return round(max(ratio, 0.01), 2)

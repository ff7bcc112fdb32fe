"""Keeping a training run from making a draft worse than it started.

The defaults were first set on the embedded self-draft, which starts near zero acceptance and
needs a large learning rate to move at all. A draft that is already good (a real 0.5B draft
beside its 1.5B target, K = 4 acceptance ~0.73) went from loss 0.50 to 30 in nine steps at that
rate, and its held-out acceptance fell 0.725 -> 0.200. Three guards, each cheap:

- **a learning rate chosen from where the draft starts** (`auto_learning_rate`): the draft's
  teacher-forced acceptance on its own training cases at step 0, measured with the target's
  cached choices (one draft pass, no target pass). It is greedy agreement (the T = 0 rule)
  whatever a case's temperature: a proxy for sampled cases, exact for greedy ones. Near zero: 3e-4 (what the embedded self-draft
  trains well at); high: 1e-5 (mlx-lm's LoRA default), log-linear in between. `lora.learning_rate`
  set to a number overrides it.
- **a stop on a diverging loss** (`LossGuard`): every batch's loss is compared with the step-0
  draft's loss on the same cases, so batch-to-batch differences in difficulty do not read as
  divergence; after warm-up, three steps in a row whose loss is above the starting draft's (by
  more than 10% plus 1e-3 nats) end the run, as does a loss that is not finite. (One step may
  overshoot and recover: a 12-step run at 1e-3 on the toy self-draft went 0.79 -> 1.42 -> 0.36.)
- **the best checkpoint** (`Checkpoints`): the training cases' acceptance (and loss, to break
  ties) is scored at step 0 and every tenth of the run; the run ends with the best scored
  weights, so it never ends worse on its own training cases than the draft it started from.

The gate still decides promotion on held-out cases; these guards only keep the run from
handing it something that got worse on the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx

LR_AT_ZERO = 3e-4  # a draft that accepts almost nothing (the embedded self:4 starts ~0.06)
LR_AT_GOOD = 1e-5  # a draft that already agrees (mlx-lm's own LoRA default)
ACCEPTANCE_ZERO = 0.1  # at or below: LR_AT_ZERO
ACCEPTANCE_GOOD = 0.9  # at or above: LR_AT_GOOD
# After warm-up a step's loss may exceed the starting draft's on the same batch by this much
# (relative), plus an absolute floor in nats (a draft that is the target has loss ~0).
DIVERGENCE_RELATIVE = 0.1
DIVERGENCE_ABSOLUTE = 1e-3
CHECKPOINTS = 10  # scored checkpoints per run, besides step 0


def auto_learning_rate(
    acceptance: float, *, at_zero: float = LR_AT_ZERO, at_good: float = LR_AT_GOOD
) -> float:
    """Peak learning rate for a draft whose training-case acceptance is `acceptance` at step 0:
    log-linear from `at_zero` (acceptance <= 0.1) to `at_good` (>= 0.9)."""
    if not math.isfinite(acceptance):
        return at_good
    f = (acceptance - ACCEPTANCE_ZERO) / (ACCEPTANCE_GOOD - ACCEPTANCE_ZERO)
    f = min(1.0, max(0.0, f))
    return at_zero * (at_good / at_zero) ** f


@dataclass(frozen=True)
class Score:
    """A draft on the training cases: greedy agreement with the target, and mean weighted KL."""

    acceptance: float
    loss: float

    def better_than(self, other: Score) -> bool:
        """Higher acceptance wins; at equal acceptance, lower loss."""
        if self.acceptance != other.acceptance:
            return self.acceptance > other.acceptance
        return self.loss < other.loss


def total_score(per_example: dict[int, tuple[float, float, int, int]]) -> Score:
    """Sum DraftTrainer.score's per-example tuples into one Score."""
    kl = sum(v[0] for v in per_example.values())
    w = sum(v[1] for v in per_example.values())
    agreed = sum(v[2] for v in per_example.values())
    n = sum(v[3] for v in per_example.values())
    return Score(agreed / n if n else 0.0, kl / w if w else 0.0)


@dataclass
class LossGuard:
    """Divergence check: after warm-up, a batch's loss may not rise above what the starting
    draft scored on the same cases (its step-0 value, batch difficulty aside)."""

    base: dict[int, tuple[float, float, int, int]]  # example key -> step-0 score
    warmup: int
    patience: int = 3  # consecutive steps above it (one overshooting step may recover)
    reason: str = ""
    _above: int = 0

    def base_loss(self, keys: list[int]) -> float:
        """The starting draft's weighted KL on these examples (a batch; repeats count twice)."""
        kl = sum(self.base[k][0] for k in keys)
        w = sum(self.base[k][1] for k in keys)
        return kl / w if w else 0.0

    def diverged(self, step: int, loss: float, base_loss: float) -> bool:
        """True (with `reason` set) when this step's loss says the run is going wrong."""
        if not math.isfinite(loss):
            self.reason = f"loss {loss} at step {step} is not finite"
            return True
        if step <= self.warmup:
            return False
        allowed = base_loss * (1 + DIVERGENCE_RELATIVE) + DIVERGENCE_ABSOLUTE
        self._above = self._above + 1 if loss > allowed else 0
        if self._above >= self.patience:
            self.reason = (
                f"loss {loss:.4f} at step {step} is above the starting draft's {base_loss:.4f} "
                f"on the same cases (allowed {allowed:.4f} after warm-up), {self._above} steps "
                "running"
            )
            return True
        return False


@dataclass
class Checkpoints:
    """The best-scoring trainable weights seen so far (step 0 included)."""

    best_step: int
    best: Score
    weights: dict[str, mx.array]
    history: list[tuple[int, Score]] = field(default_factory=list)

    def offer(self, step: int, score: Score, weights: dict[str, mx.array]) -> bool:
        """Keep `weights` if they score better (ties go to the later step); True if kept."""
        self.history.append((step, score))
        if score.better_than(self.best) or (
            score.acceptance == self.best.acceptance and score.loss <= self.best.loss
        ):
            self.best_step, self.best, self.weights = step, score, weights
            return True
        return False


def checkpoint_every(steps: int) -> int:
    """Steps between scored checkpoints for a run of `steps` steps."""
    return max(1, steps // CHECKPOINTS)

"""Repeated measurements and when a difference between two of them is more than noise.

A speed read once means little on a shared machine (the target alone read 10.2 and 15.0 tok/s
on two prompts of one demo run). So every figure the demo prints is the median of interleaved
repeats with its range, and a ratio is called faster or slower only when the two sets of
repeats do not overlap: every run of one beat every run of the other. Pure functions, no I/O.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """The median of some repeats and their range."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def describe(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


@dataclass(frozen=True)
class Comparison:
    """`a` against `b`: the ratio of medians, and the range of ratios the repeats allow
    (slowest a over fastest b, fastest a over slowest b). The range excludes 1 exactly when
    the repeats do not overlap."""

    ratio: float
    low: float
    high: float
    repeats: int  # the fewer repeats of the two sides

    @property
    def verdict(self) -> str:
        """ "faster", "slower", or "noise" (the repeats overlap, or one side has no spread)."""
        if self.repeats < 2:  # one run has no spread to exceed
            return "noise"
        if self.low > 1.0:
            return "faster"
        if self.high < 1.0:
            return "slower"
        return "noise"

    def describe(self) -> str:
        """What a user may be told: a speedup only where it exceeds the spread."""
        span = f"{self.low:.2f}-{self.high:.2f}"
        if self.verdict == "faster":
            return f"{self.ratio:.2f}x faster ({span})"
        if self.verdict == "slower":
            return f"{self.ratio:.2f}x, slower ({span})"
        if self.repeats < 2:
            return f"within noise (one run each, {span})"
        return f"within noise ({span})"


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Compare repeats `a` with repeats `b` (e.g. tokens/s after training vs the target alone)."""
    if not a or not b:
        raise ValueError("compare needs at least one value on each side")
    sa, sb = Spread.of(a), Spread.of(b)
    if sb.low <= 0 or sb.median <= 0:  # a side that measured nothing cannot be divided by
        return Comparison(0.0, 0.0, float("inf"), 0)
    return Comparison(sa.median / sb.median, sa.low / sb.high, sa.high / sb.low, min(sa.n, sb.n))


def normalised(
    runs: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]]
) -> list[float]:
    """Every run of every prompt over its own prompt's reference median, so prompts whose
    answers decode at different speeds can be pooled (the reference's own runs come out
    around 1.0)."""
    out: list[float] = []
    for prompt, values in runs.items():
        base = statistics.median(reference[prompt])
        out += [v / base if base > 0 else 0.0 for v in values]
    return out

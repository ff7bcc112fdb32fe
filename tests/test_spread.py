"""When the demo may call one speed faster than another: only when the repeats do not overlap."""

from __future__ import annotations

import pytest
from speclora.client.spread import Spread, compare, normalised


def test_spread_is_median_and_range() -> None:
    s = Spread.of([15.0, 10.2, 14.1])
    assert (s.median, s.low, s.high, s.n) == (14.1, 10.2, 15.0, 3)
    assert s.describe() == "14.1 (10.2-15.0)"


def test_a_clear_speedup_is_claimed_with_its_range() -> None:
    c = compare([21.0, 22.5, 24.0], [14.0, 15.0, 15.5])
    assert c.verdict == "faster"
    assert c.ratio == pytest.approx(22.5 / 15.0)
    assert (c.low, c.high) == pytest.approx((21.0 / 15.5, 24.0 / 14.0))
    assert c.describe() == "1.50x faster (1.35-1.71)"


def test_overlapping_repeats_are_noise_even_when_the_medians_differ() -> None:
    # The demo's own history: the target alone read 10.2 and 15.0 tok/s in one run. A median
    # 30% higher is no speedup when the slowest "after" run is slower than the fastest "before".
    c = compare([13.0, 14.5, 16.0], [10.2, 11.0, 15.0])
    assert c.ratio == pytest.approx(14.5 / 11.0)
    assert c.verdict == "noise"
    assert c.describe() == "within noise (0.87-1.57)"
    assert "faster" not in c.describe()


def test_touching_ranges_are_noise() -> None:
    assert compare([15.0, 16.0], [14.0, 15.0]).verdict == "noise"


def test_a_clear_slowdown_is_said() -> None:
    c = compare([10.0, 10.5, 11.0], [14.0, 15.0, 16.0])
    assert c.verdict == "slower"
    assert c.describe() == "0.70x, slower (0.62-0.79)"


def test_one_run_each_never_claims_anything() -> None:
    c = compare([30.0], [10.0])
    assert c.ratio == pytest.approx(3.0)
    assert c.verdict == "noise"
    assert c.describe() == "within noise (one run each, 3.00-3.00)"


def test_a_side_that_measured_nothing_is_not_divided_by() -> None:
    c = compare([12.0, 13.0], [0.0, 14.0])
    assert c.verdict == "noise"
    with pytest.raises(ValueError):
        compare([], [1.0])


def test_normalised_pools_prompts_of_different_speeds() -> None:
    # Prompt b decodes at half prompt a's speed; after normalising, the target's own runs sit
    # around 1 and a uniform 1.5x shows as 1.5 on both.
    target = {"a": [20.0, 19.0, 21.0], "b": [10.0, 9.5, 10.5]}
    after = {"a": [30.0, 30.0, 30.0], "b": [15.0, 15.0, 15.0]}
    assert normalised(after, target) == pytest.approx([1.5] * 6)
    pooled = normalised(target, target)
    assert min(pooled) == pytest.approx(0.95) and max(pooled) == pytest.approx(1.05)
    assert compare(normalised(after, target), pooled).verdict == "faster"

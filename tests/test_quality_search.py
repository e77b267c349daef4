"""The quality benchmark's learning-rate search and statistics, against curves and data with known
answers (the benchmark itself runs in test_quality_benchmark)."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality_search import Point, crossing, next_lr
from quality_stats import holm, mean_se, paired_interval, t_quantile

LEVELS = (0.8, 0.9)


def _search(curve, start: float, width: float = 1.8, limit: int = 20) -> list[Point]:
    points: list[Point] = []
    for _ in range(limit):
        lr = next_lr(points, LEVELS, start, width, (1e-7, 1.0))
        if lr is None:
            return points
        points.append(Point(lr, curve(lr)))
    raise AssertionError(f"no end after {limit} runs: {points}")


def _logistic(mid: float):
    return lambda lr: 1 / (1 + math.exp(-3 * (math.log(lr) - math.log(mid))))


@pytest.mark.parametrize("start", [1e-6, 1e-4, 3e-2])
def test_the_search_brackets_each_level_within_the_width(start) -> None:
    curve = _logistic(1e-4)
    points = _search(curve, start)
    for level in LEVELS:
        found = crossing(points, level)
        assert found is not None and found.ratio <= 1.8 and found.low.learned < level <= found.high.learned
        exact = 1e-4 * math.exp(math.log(level / (1 - level)) / 3)  # the curve's inverse
        assert abs(math.log(found.lr / exact)) < math.log(1.8)  # the crossing lies inside its bracket
    assert len(points) <= 8


def test_the_search_stops_at_its_limits_when_a_method_cannot_learn() -> None:
    points = _search(lambda lr: 0.3, 1e-3)
    assert all(p.learned == 0.3 for p in points) and max(p.lr for p in points) == 1.0
    assert crossing(points, 0.8) is None


def test_a_method_still_learning_more_at_the_edge_is_run_at_the_limit_itself() -> None:
    """S2FT's seed 2 learned 0.57, 0.59, 0.62 at 2e-3, 6e-3, 1.8e-2: one step more (5.4e-2) is past
    the limit 3e-2, which is run instead; then the search ends there, and likewise at the low end."""
    limits = (1e-6, 3e-2)
    rising = [Point(2e-3, 0.57), Point(6e-3, 0.59), Point(1.8e-2, 0.62)]
    assert next_lr(rising, (0.7, 0.8), 2e-3, 3.0, limits) == 3e-2
    assert next_lr([*rising, Point(3e-2, 0.64)], (0.7, 0.8), 2e-3, 3.0, limits) is None
    passed = [Point(2e-6, 0.95), Point(6e-6, 0.97)]
    assert next_lr(passed, (0.7, 0.8), 6e-6, 3.0, limits) == 1e-6
    assert next_lr([Point(1e-6, 0.9), *passed], (0.7, 0.8), 6e-6, 3.0, limits) is None


def test_the_search_stops_climbing_where_learning_turns_down_and_keeps_the_reachable_level() -> None:
    def curve(lr: float) -> float:  # peaks at 0.85 near 1e-4, then falls
        return 0.85 * math.exp(-(math.log(lr / 1e-4) ** 2) / 2)

    points = _search(curve, 1e-5)
    assert crossing(points, 0.9) is None and max(p.lr for p in points) <= 1e-3
    found = crossing(points, 0.8)
    assert found is not None and found.ratio <= 1.8 and len(points) <= 7


def test_the_first_crossing_in_rate_order_is_read_where_the_curve_falls_again() -> None:
    points = [Point(1e-5, 0.2), Point(3e-5, 0.85), Point(1e-4, 0.95), Point(3e-4, 0.5), Point(1e-3, 0.97)]
    found = crossing(points, 0.9)
    assert (found.low.lr, found.high.lr) == (3e-5, 1e-4) and found.weight == pytest.approx(0.5)


def test_mean_and_standard_error() -> None:
    estimate = mean_se([0.2, 0.4, 0.6])
    assert estimate.mean == pytest.approx(0.4) and estimate.se == pytest.approx(0.2 / math.sqrt(3))
    assert mean_se([0.5]).se is None


def test_the_paired_interval_finds_a_real_difference_and_not_a_null_one() -> None:
    rng = random.Random(1)
    base = [[float(rng.random() < 0.6) for _ in range(200)] for _ in range(3)]
    better = [[max(x, float(rng.random() < 0.3)) for x in seed] for seed in base]  # ~+0.12
    real = paired_interval(better, base, shared_items=True)
    assert real.excludes_zero and 0.05 < real.difference < 0.2 and real.low < real.difference < real.high
    same = paired_interval(base, [list(s) for s in base], shared_items=True)
    assert same.difference == 0 and not same.excludes_zero
    noise = [[float(rng.random() < 0.6) for _ in range(200)] for _ in range(3)]
    assert not paired_interval(noise, base, shared_items=False).excludes_zero


def test_three_seeds_that_agree_in_sign_but_spread_are_no_claim() -> None:
    """FPF's first-task reading: +0.03, +0.47, +0.05 by seed. The bootstrap over 3 seeds spans about
    [min, max] of them and excludes 0; the t interval over the seeds does not, so nothing is claimed."""
    base = [[0.0] * 100 for _ in range(3)]
    ahead = [[1.0] * k + [0.0] * (100 - k) for k in (3, 47, 5)]
    found = paired_interval(ahead, base, shared_items=False)
    assert found.difference == pytest.approx(0.55 / 3) and 0 < found.low <= 0.03 and 0.45 < found.high <= 0.47
    spread = math.sqrt(sum((x - 0.55 / 3) ** 2 for x in (0.03, 0.47, 0.05)) / 2 / 3)
    assert found.seed_low == pytest.approx(0.55 / 3 - 4.302653 * spread, abs=1e-4) and found.seed_low < 0
    assert not found.excludes_zero and 0.05 < found.seed_p < 0.5
    steady = [[1.0] * k + [0.0] * (100 - k) for k in (20, 24, 22)]
    assert paired_interval(steady, base, shared_items=False).excludes_zero  # both intervals exclude 0


def test_the_t_quantiles_are_the_tabled_ones() -> None:
    for df, tabled in ((1, 12.706205), (2, 4.302653), (3, 3.182446), (9, 2.262157), (60, 2.000298)):
        assert t_quantile(0.975, df) == pytest.approx(tabled, abs=2e-5)
    assert t_quantile(0.95, 4) == pytest.approx(2.131847, abs=2e-5)


def test_the_seeds_p_is_0_05_where_their_interval_touches_0() -> None:
    import quality_stats

    m = 4.302653 / math.sqrt(3)  # three seeds m - 1, m, m + 1: t = m / (1 / sqrt(3)) = t(2, 0.975)
    low, high, p = quality_stats._t_interval([m - 1, m, m + 1], 0.95)
    assert low == pytest.approx(0, abs=1e-5) and high == pytest.approx(2 * m, abs=1e-5)
    assert p == pytest.approx(0.05, abs=1e-5)
    assert quality_stats._t_interval([0.2, 0.2, 0.2], 0.95)[2] == pytest.approx(0.0, abs=1e-9)  # no spread
    assert quality_stats._t_interval([0.2], 0.95) == (None, None, None)


def test_holm_steps_down_from_the_smallest_p_and_stops_at_the_first_it_keeps() -> None:
    # sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, then 0.03 > 0.05/2 stops; 0.04 is not reached
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert holm([0.02, 0.001, 0.04]) == [True, True, True]  # 0.001, 0.02 <= 0.025, 0.04 <= 0.05
    assert holm([0.03, 0.03]) == [False, False] and holm([0.03, 0.03], alpha=0.1) == [True, True]
    assert holm([0.0005, 0.00061] + [0.5] * 82) == [True, False] + [False] * 82  # 0.00061 > 0.05 / 83
    assert holm([]) == []


def test_the_paired_interval_refuses_unpaired_data() -> None:
    with pytest.raises(ValueError, match="same seeds and the same items"):
        paired_interval([[1.0, 0.0]], [[1.0]], shared_items=True)


def test_a_peak_one_step_jumped_over_is_looked_for_once() -> None:
    def curve(lr: float) -> float:  # peaks at 0.86 at 3.5e-4, between the search's steps 2e-4 and 6e-4
        return 0.86 - 0.2 * math.log(lr / 3.5e-4) ** 2

    points = _search(curve, 2e-4, width=3.0)
    assert [p.lr for p in points] == pytest.approx([2e-4, 6e-4, 1.8e-3, math.sqrt(2e-4 * 6e-4)])
    assert max(p.learned for p in points) > 0.85 and crossing(points, 0.8) is not None


def test_a_bracket_one_step_wide_between_rounded_rates_is_wide_enough() -> None:
    """Runs keep their rate to 3 digits: one step of 3 down from 6.67e-5 is 2.22e-5, a ratio of 3.0045,
    which must not count as wider than a width of 3 (it cost a bisection run once)."""
    points = [Point(2.22e-5, 0.46), Point(6.67e-5, 0.724), Point(2e-4, 0.828), Point(6e-4, 0.787)]
    assert next_lr(points, (0.7, 0.8), 2e-4, 3.0, (1e-6, 3e-2)) is None
    assert next_lr(points, (0.7, 0.8), 2e-4, 2.9, (1e-6, 3e-2)) == pytest.approx(math.sqrt(2.22e-5 * 6.67e-5))


def test_a_peak_below_the_starting_rate_is_looked_for_below_the_lowest_run() -> None:
    """ProMoT's seed 2 learned 0.677, 0.661, 0.651 at 1e-4, 1.73e-4, 3e-4: falling from its lowest run
    on, so its peak lies lower; the search used to stop there. It steps down while learning falls."""
    limits = (1e-6, 3e-2)
    falling = [Point(1e-4, 0.677), Point(1.73e-4, 0.661), Point(3e-4, 0.651)]
    assert next_lr(falling, (0.7, 0.8), 1e-4, 3.0, limits) == pytest.approx(1e-4 / 3)
    at_the_limit = [Point(1e-6, 0.68), *falling]  # no lower step: between the best and its neighbour
    assert next_lr(at_the_limit, (0.7, 0.8), 1e-4, 3.0, limits) == pytest.approx(1e-5)

    def curve(lr: float) -> float:  # peaks at 0.86 at 2e-5, a decade below the start
        return 0.86 - 0.05 * math.log(lr / 2e-5) ** 2

    points = _search(curve, 2e-4, width=3.0)
    assert min(p.lr for p in points) < 2e-5 < max(p.lr for p in points)
    assert crossing(points, 0.8) is not None and crossing(points, 0.9) is None

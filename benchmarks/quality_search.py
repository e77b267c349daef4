"""Learning rates chosen per method and seed to reach target levels of learning, not a fixed grid.

A method's learning `t(lr)` (the mean held-out accuracy of the new tasks, each after its own stage)
rises with the learning rate until it saturates or turns down (too high a rate for the steps
given). For each level (0.8 and 0.9) the search first brackets it, a run below and a run at or
above, stepping the rate by a factor of 3 from the method's starting rate (a step past the
search's limits runs the limit itself), then bisects the bracket on log(lr). Where learning turns
down before it reaches a level, the search looks toward the peak: below the lowest run while
learning falls from there on (a peak below the starting rate), else once between the best run and
its better neighbour (a peak that one step of 3 jumped over). What a method keeps at a matched
level is read by linear interpolation between the two runs that bracket it (the first crossing in
rate order), so methods are compared at the same learning, not at their best runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

STEP = 3.0  # the bracketing step (a factor on the rate)
ROUNDING = 1.01  # runs keep 3 significant digits of their rate: 6.67e-5 / 2.22e-5 is 3.0045, one step
PEAK_WIDTH = 2.0  # around a peak below a level, neighbours further apart than this are bisected once


@dataclass(frozen=True)
class Point:
    lr: float
    learned: float


@dataclass(frozen=True)
class Crossing:
    """Where the curve crosses `level`: between runs `low` (below) and `high` (at or above); `weight`
    is the share of the way from low to high at which it crosses, `lr` the rate there (log scale)."""

    level: float
    low: Point
    high: Point
    weight: float

    @property
    def lr(self) -> float:
        return math.exp((1 - self.weight) * math.log(self.low.lr) + self.weight * math.log(self.high.lr))

    @property
    def ratio(self) -> float:
        """How wide the bracket is (high lr / low lr): the search narrows it to a set width."""
        return self.high.lr / self.low.lr


def crossing(points: list[Point], level: float) -> Crossing | None:
    """The first crossing of `level` in rate order, or None where no run pair brackets it."""
    ordered = sorted(points, key=lambda p: p.lr)
    for low, high in itertools.pairwise(ordered):
        if low.learned < level <= high.learned:
            weight = (level - low.learned) / (high.learned - low.learned)
            return Crossing(level, low, high, weight)
    return None


def next_lr(
    points: list[Point], levels: tuple[float, ...], start: float, width: float, limits: tuple[float, float]
) -> float | None:
    """The next rate to run, or None when every level the method reaches is bracketed to within
    `width` (the ratio of a bracket's ends) or the limits stop the search. Brackets first: above the
    highest run while some level is not reached yet and learning still rises there (past the rate
    where it turns down, a higher one will not learn more), below the lowest while some level is
    already passed there; then the widest bracket is halved on log(lr); then, below a level learning
    never reached, toward the peak: below the lowest run while learning falls from there on, else the
    best run's side toward it (once)."""
    if not points:
        return start
    ordered = sorted(points, key=lambda p: p.lr)
    lowest, highest = ordered[0], ordered[-1]
    rising = highest.learned >= max(p.learned for p in points)
    if rising and highest.learned < max(levels):
        return _within(highest.lr * STEP, highest.lr, limits)
    if lowest.learned >= min(levels):
        return _within(lowest.lr / STEP, lowest.lr, limits)
    brackets = [c for c in (crossing(points, level) for level in levels) if c is not None]
    widest = max(brackets, key=lambda c: c.ratio, default=None)
    if widest is not None and widest.ratio > width * ROUNDING:
        return math.sqrt(widest.low.lr * widest.high.lr)
    return _toward_peak(ordered, levels, limits)


def _within(lr: float, last: float, limits: tuple[float, float]) -> float | None:
    """A bracketing step, held to the limits: a step past one runs the limit itself (once), so a
    method still learning more at the edge is read there, not cut off one step short of it."""
    low, high = limits
    if low <= lr <= high:
        return lr
    edge = high if lr > high else low
    return edge if max(edge, last) / min(edge, last) > ROUNDING else None


def _toward_peak(
    ordered: list[Point], levels: tuple[float, ...], limits: tuple[float, float]
) -> float | None:
    """Where no run reaches a level and learning turns down above the best run: one step below the
    lowest run where that is the best (learning falls from there on, the peak lies lower), else the
    rate between the best run and its better neighbour (the peak lies on that side), unless they are
    close already."""
    best = max(range(len(ordered)), key=lambda i: ordered[i].learned)
    if ordered[best].learned >= max(levels) or best == len(ordered) - 1:
        return None
    lowest = ordered[0].lr
    if best == 0 and (lower := _within(lowest / STEP, lowest, limits)) is not None:
        return lower
    neighbours = [i for i in (best - 1, best + 1) if 0 <= i < len(ordered)]
    other = ordered[max(neighbours, key=lambda i: ordered[i].learned)]
    low, high = sorted((ordered[best].lr, other.lr))
    return math.sqrt(low * high) if high / low > PEAK_WIDTH else None


def interpolate(values_low: float, values_high: float, weight: float) -> float:
    return (1 - weight) * values_low + weight * values_high

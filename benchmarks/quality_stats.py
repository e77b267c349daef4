"""Statistics of the quality benchmark: mean and standard error over seeds, and paired intervals of a
difference between two methods measured on the same seeds and items.

A difference "A keeps more than B" is claimed only where its 95% interval excludes 0. The interval
comes from a two-level bootstrap: the seeds are drawn again with replacement (each seed brings its
own data and training draws), and within them the items (probes, held-out items). Items shared by
every seed (the probes, screened once on the base model) are drawn with the same indices in every
seed, so what they have in common is not counted as independent evidence; items each seed draws
anew (the tasks' held-out items) are drawn per seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    mean: float
    se: float | None  # None with one seed
    seeds: int


@dataclass(frozen=True)
class Interval:
    difference: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_se(values: list[float]) -> Estimate:
    """The mean over seeds and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, None, n)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def paired_interval(
    a: list[list[float]],
    b: list[list[float]],
    shared_items: bool,
    reps: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """mean(a) - mean(b), where a[s][i] and b[s][i] are the scores of item i in seed s (interpolated
    scores may lie between 0 and 1), averaged over items then seeds; with its bootstrap interval."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("paired_interval needs the same seeds and the same items on both sides")
    diffs = [[x - y for x, y in zip(xs, ys, strict=True)] for xs, ys in zip(a, b, strict=True)]
    point = sum(sum(d) / len(d) for d in diffs) / len(diffs)
    rng = random.Random(seed)
    draws = []
    for _ in range(reps):
        seeds = [rng.randrange(len(diffs)) for _ in diffs]
        items = _indices(rng, len(diffs[0])) if shared_items else None
        total = 0.0
        for s in seeds:
            picked = items if items is not None else _indices(rng, len(diffs[s]))
            total += sum(diffs[s][i] for i in picked) / len(picked)
        draws.append(total / len(seeds))
    draws.sort()
    tail = (1 - level) / 2
    return Interval(point, draws[int(tail * reps)], draws[min(reps - 1, int((1 - tail) * reps))])


def _indices(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(n) for _ in range(n)]

"""Statistics of the quality benchmark: mean and standard error over seeds, and paired intervals of a
difference between two methods measured on the same seeds and items.

A difference "A keeps more than B" is claimed only where two 95% intervals both exclude 0:
- a two-level bootstrap: the seeds are drawn again with replacement (each seed brings its own data
  and training draws), and within them the items (probes, held-out items). Items shared by every
  seed (the probes, screened once on the base model) are drawn with the same indices in every seed,
  so what they have in common is not counted as independent evidence; items each seed draws anew
  (the tasks' held-out items) are drawn per seed.
- a t interval over the seeds' mean differences (n - 1 degrees of freedom). With 3 seeds the
  bootstrap's percentile interval is about [min, max] of the seeds' differences (a resample of the
  lowest seed three times has probability 1/27, above the 2.5% tail), so alone it excludes 0
  whenever the seeds agree in sign, which 3 seeds do by chance 1 time in 4 where there is no
  difference. The t interval is the standard one for few clusters; it holds each seed's item noise
  inside that seed's mean, for the probes asked, and the bootstrap adds the probes' own sampling.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Estimate:
    mean: float
    se: float | None  # None with one seed
    seeds: int


@dataclass(frozen=True)
class Interval:
    difference: float
    low: float  # the two-level bootstrap's bounds
    high: float
    seed_low: float | None = None  # the t interval over the seeds' differences (None with one seed)
    seed_high: float | None = None
    seed_p: float | None = None  # the t test's two-sided p over the seeds (for a reader's own correction)

    @property
    def excludes_zero(self) -> bool:
        """Both intervals exclude 0 (with one seed, the bootstrap alone: too few seeds to claim)."""
        boot = self.low > 0 or self.high < 0
        return boot and (self.seed_low is None or self.seed_low > 0 or self.seed_high < 0)


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
    seed_low, seed_high, seed_p = _t_interval([sum(d) / len(d) for d in diffs], level)
    return Interval(
        point,
        draws[int(tail * reps)],
        draws[min(reps - 1, int((1 - tail) * reps))],
        seed_low,
        seed_high,
        seed_p,
    )


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Which of `pvalues` Holm's step-down procedure rejects at family-wise error `alpha`: the k-th
    smallest (from 0) is compared with alpha / (n - k), and the first that fails stops the rest."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = [False] * len(pvalues)
    for k, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - k):
            break
        rejected[i] = True
    return rejected


def _t_interval(values: list[float], level: float) -> tuple[float | None, float | None, float | None]:
    """mean ± t(n - 1) · SE over `values` (the seeds' mean differences), and the two-sided p of the
    mean being 0; all None for one value."""
    estimate = mean_se(values)
    if estimate.se is None:
        return None, None, None
    df = len(values) - 1
    half = t_quantile(1 - (1 - level) / 2, df) * estimate.se
    if estimate.se == 0:  # every seed differs by the same amount
        p = 1.0 if estimate.mean == 0 else 0.0
    else:
        p = max(0.0, 2 * (0.5 - _t_half(abs(estimate.mean) / estimate.se, df)))
    return estimate.mean - half, estimate.mean + half, p


def _t_half(x: float, df: int, steps: int = 2000) -> float:
    """P(0 < T < x) for Student's t with `df` degrees of freedom (the standard library has no t): with
    t = sqrt(df) tan(u) its density becomes c sqrt(df) cos(u)^(df - 1) on [0, pi/2), smooth and
    bounded for any x (infinite included), integrated by Simpson's rule."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    end = math.atan(x / math.sqrt(df))
    h = end / steps
    inner = sum((4 if i % 2 else 2) * math.cos(i * h) ** (df - 1) for i in range(1, steps))
    return math.exp(log_norm) * math.sqrt(df) * h / 3 * (1.0 + inner + math.cos(end) ** (df - 1))


@lru_cache
def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection."""
    low, high = 0.0, 1.0
    while 0.5 + _t_half(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if 0.5 + _t_half(mid, df) < p else (low, mid)
    return (low + high) / 2


def _indices(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(n) for _ in range(n)]

"""Evaluation math as pure functions: pass@k, majority vote, and confidence intervals.

Used by `nanor1/evaluate.py`; every function here is checked against hand-computed values in
tests/test_evalmath.py.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Hashable, NamedTuple, Sequence


class Estimate(NamedTuple):
    """A point estimate with its (lo, hi) confidence interval."""
    value: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k).

    Computed as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge
    binomials; when fewer than k samples are wrong, every k-subset holds a correct one and pass@k = 1.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(answers: Sequence[str | None], key: Callable[[str], Hashable] | None = None) -> str | None:
    """The most frequent answer (cons@k, R1 paper §3); None never wins, ties go to the first seen.

    `key` maps answers to the form compared (e.g. whitespace-normalised); the answer returned is the
    first occurrence of the winning form. Returns None when every answer is None.
    """
    key = key or (lambda a: a)
    counts: Counter = Counter()
    first: dict[Hashable, tuple[int, str]] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        kk = key(a)
        counts[kk] += 1
        first.setdefault(kk, (i, a))
    if not counts:
        return None
    best = max(counts, key=lambda kk: (counts[kk], -first[kk][0]))
    return first[best][1]


def wilson_interval(successes: float, n: float, z: float = 1.96) -> Estimate:
    """Wilson score interval for a binomial proportion (Wilson 1927); sane at p = 0 or 1 and small n.

    centre = (p + z^2/2n) / (1 + z^2/n),  half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    `n` may be fractional (an effective sample size, see `cluster_interval`).
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half))


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased (ddof=1) sample variance."""
    m = len(xs)
    mean = sum(xs) / m
    var = sum((x - mean) ** 2 for x in xs) / (m - 1) if m > 1 else 0.0
    return mean, var


def cluster_interval(unit_means: Sequence[float], samples_per_unit: int = 1, z: float = 1.96) -> Estimate:
    """Interval for a mean accuracy whose samples come clustered by problem (k samples per problem).

    The problems, not the samples, are independent, so the variance is estimated from the per-problem
    means: SE^2 = s^2 / m. We turn it into Kish's effective sample size n_eff = p(1-p) / SE^2, clamp it
    to [m, m*k] (design effect between 1 and k) and take the Wilson interval at n_eff. With one binary
    sample per problem this is exactly `wilson_interval(sum, m)`.
    """
    m = len(unit_means)
    if m == 0:
        raise ValueError("cluster_interval needs at least one problem")
    if any(not 0.0 <= x <= 1.0 for x in unit_means):
        raise ValueError("cluster_interval needs per-problem means in [0, 1]")
    p, var = _mean_var(unit_means)
    lo_n, hi_n = float(m), float(m * max(1, samples_per_unit))
    se2 = var / m
    n_eff = hi_n if se2 == 0.0 and 0.0 < p < 1.0 else lo_n if se2 == 0.0 else p * (1 - p) / se2
    n_eff = min(hi_n, max(lo_n, n_eff))
    est = wilson_interval(p * n_eff, n_eff, z)
    return Estimate(p, est.lo, est.hi)


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> Estimate:
    """Mean of a_i - b_i over the same problems with a normal-approximation interval.

    Pairing removes the between-problem variance both models share, so the interval is far tighter
    than two independent intervals; SE = sd(a - b) / sqrt(m). Clipped to [-1, 1].
    """
    if len(a) != len(b) or not a:
        raise ValueError("paired_difference needs two equally long, non-empty sequences")
    d = [x - y for x, y in zip(a, b)]
    mean, var = _mean_var(d)
    half = z * math.sqrt(var / len(d))
    return Estimate(mean, max(-1.0, mean - half), min(1.0, mean + half))

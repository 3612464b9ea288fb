"""Intervals for the figures a run reports: a held-out accuracy, and the gain between two evaluations of the
same prompts.

- :func:`wilson_interval`: the 95% Wilson score interval of a proportion k/n (well behaved near 0 and 1, unlike
  the normal approximation).
- :func:`paired_gain`: the gain after − before on the same n prompts, with the 95% interval of the mean of the
  per-prompt differences d_i ∈ {−1, 0, 1} (normal approximation, standard error sd(d)/√n). Pairing removes the
  prompts' own difficulty from the noise, so it is much tighter than two independent intervals.
- :func:`welch_interval`: the difference of two means over seeds (runs), with Welch's t interval (unequal variances,
  Welch–Satterthwaite degrees of freedom; :func:`t_quantile` computes Student's t quantile).
- :func:`paired_bootstrap`: two arms compared on the same prompts at the same seeds — the mean over seeds × prompts
  of the per-prompt difference of 0/1 outcomes, with a two-stage bootstrap interval (seeds resampled, then prompts,
  the same prompt draw for every seed and both arms, so the pairing by prompt is kept and both the training noise
  between seeds and the sampling of prompts enter the interval). :func:`mcnemar_p`: the exact McNemar test on the
  discordant (seed, prompt) pairs, which treats them as independent.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval [low, high]."""

    value: float
    low: float
    high: float
    n: int

    def as_record(self, prefix: str) -> dict:
        return {prefix: self.value, f"{prefix}_ci95_low": self.low, f"{prefix}_ci95_high": self.high,
                f"{prefix}_n": self.n}

    def percent(self, sign: bool = False) -> str:
        fmt = "{:+.1f}" if sign else "{:.1f}"
        return f"{fmt.format(100 * self.value)}% (95% CI {100 * self.low:.1f} to {100 * self.high:.1f}, n={self.n})"


def wilson_interval(successes: int, n: int, z: float = Z95) -> Estimate:
    """Proportion ``successes / n`` with its Wilson score interval."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 ≤ successes ≤ n and n > 0, got {successes}/{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def paired_gain(before: Sequence[bool], after: Sequence[bool], z: float = Z95) -> Estimate:
    """Mean of ``after_i − before_i`` over the same prompts, with its normal-approximation interval."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_gain needs two equal, non-empty lists, got {len(before)} and {len(after)}")
    diffs = [float(a) - float(b) for b, a in zip(before, after)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return Estimate(mean, mean - half, mean + half, n)


def _t_pdf(x: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: float, steps: int = 2000) -> float:
    """P(T ≤ x) for x ≥ 0 (Simpson's rule on the density from 0 to x)."""
    h = x / steps
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, steps))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(x, df))


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile for 0.5 ≤ p < 1 and df > 0 (bisection on the CDF; about 1e-7 accurate)."""
    if not 0.5 <= p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 ≤ p < 1 and df > 0, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def welch_interval(xs: Sequence[float], ys: Sequence[float], level: float = 0.95) -> Estimate:
    """mean(xs) − mean(ys) with Welch's t interval; n = len(xs) + len(ys). Needs ≥ 2 values on each side and some
    spread."""
    if len(xs) < 2 or len(ys) < 2:
        raise ValueError(f"welch_interval needs at least 2 values on each side, got {len(xs)} and {len(ys)}")
    va, vb = (statistics.variance(v) / len(v) for v in (xs, ys))
    diff = statistics.fmean(xs) - statistics.fmean(ys)
    if va + vb == 0:
        return Estimate(diff, diff, diff, len(xs) + len(ys))
    df = (va + vb) ** 2 / (va**2 / (len(xs) - 1) + vb**2 / (len(ys) - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(va + vb)
    return Estimate(diff, diff - half, diff + half, len(xs) + len(ys))


def _outcome_matrix(runs: Sequence[Sequence[int]], what: str):
    import numpy as np

    matrix = np.asarray([[float(x) for x in run] for run in runs])
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"{what}: expected one equal-length, non-empty list of 0/1 outcomes per seed")
    return matrix


def paired_bootstrap(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> Estimate:
    """Arm ``a`` minus arm ``b``: ``a[s][i]``, ``b[s][i]`` are the 0/1 outcomes of prompt i in the runs of seed s
    (the same prompts and seeds on both sides). Value: the mean over seeds × prompts of a − b; interval: the
    percentile interval of ``n_boot`` two-stage bootstrap means (S seeds drawn with replacement, then N prompts drawn
    with replacement, the same prompt draw for every drawn seed and both arms); n = seeds × prompts."""
    import numpy as np

    d = _outcome_matrix(a, "paired_bootstrap a") - _outcome_matrix(b, "paired_bootstrap b") if (
        len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))) else None
    if d is None:
        raise ValueError("paired_bootstrap: a and b need the same seeds and the same prompts (equal shapes)")
    seeds, prompts = d.shape
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, 1000):
        size = min(1000, n_boot - start)
        s = rng.integers(0, seeds, (size, seeds))
        i = rng.integers(0, prompts, (size, prompts))
        means.append(d[s[:, :, None], i[:, None, :]].mean(axis=(1, 2)))
    low, high = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(d.mean()), float(low), float(high), seeds * prompts)


def mcnemar_p(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Exact two-sided McNemar p-value over all (seed, prompt) pairs: with n10 pairs where only ``a`` is right and
    n01 where only ``b`` is, 2·P(X ≤ min(n10, n01)) for X ~ Binomial(n10 + n01, ½), capped at 1 (1 without
    discordant pairs)."""
    pairs = [(x, y) for run_a, run_b in zip(a, b) for x, y in zip(run_a, run_b)]
    n10 = sum(1 for x, y in pairs if x and not y)
    n01 = sum(1 for x, y in pairs if y and not x)
    n = n10 + n01
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, j) for j in range(min(n10, n01) + 1)) / 2**n
    return min(1.0, 2 * tail)

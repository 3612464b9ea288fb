"""Intervals for the figures a run reports: a held-out accuracy, and the gain between two evaluations of the
same prompts.

- :func:`wilson_interval`: the 95% Wilson score interval of a proportion k/n (well behaved near 0 and 1, unlike
  the normal approximation).
- :func:`paired_gain`: the gain after − before on the same n prompts, with the 95% interval of the mean of the
  per-prompt differences d_i ∈ {−1, 0, 1} (normal approximation, standard error sd(d)/√n). Pairing removes the
  prompts' own difficulty from the noise, so it is much tighter than two independent intervals.
"""

from __future__ import annotations

import math
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

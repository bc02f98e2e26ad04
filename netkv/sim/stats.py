"""Means with 95% confidence intervals over seeds, and paired comparisons.

The interval is Student's t: ``mean +- t(0.975, n - 1) * s / sqrt(n)`` with the sample
standard deviation ``s``. Comparisons between two policies are *paired* by seed (the same
background schedule, noise and hashing), so the interval is that of the per-seed
differences, which is what says whether one policy is better beyond the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 30)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True, slots=True)
class Interval:
    """``mean +- half`` (95%), over ``n`` values."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.half, "n": self.n}


def ci95(values: Sequence[float]) -> Interval:
    """Mean and 95% half-width; a single value has an infinite interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.inf, 1)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Interval(mean, t975(n - 1) * math.sqrt(var / n), n)


Verdict = Literal["win", "tie", "loss"]


def verdict(diff: Interval, lower_is_better: bool = True, eps: float = 1e-6) -> Verdict:
    """``diff`` = subject minus other, per seed. A win or a loss only beyond the interval
    (and beyond ``eps``, so identical choices are a tie, not a rounding-error win)."""
    better = diff.high < -eps if lower_is_better else diff.low > eps
    worse = diff.low > eps if lower_is_better else diff.high < -eps
    return "win" if better else "loss" if worse else "tie"


def paired(subject: Sequence[float], other: Sequence[float]) -> Interval:
    """Interval of the per-seed difference ``subject - other``."""
    if len(subject) != len(other):
        raise ValueError("paired values need the same seeds")
    return ci95([a - b for a, b in zip(subject, other, strict=True)])


def reduction_pct(subject: Sequence[float], other: Sequence[float]) -> Interval:
    """Per-seed ``100 * (1 - subject / other)`` (positive: the subject is lower)."""
    return ci95([100.0 * (1.0 - a / b) for a, b in zip(subject, other, strict=True)])

"""Intervals that use every pair: quantiles from the merged latency sketches, a cost ratio from sums.

No cap on n and no resampling: a window's counters hold everything needed.

- Quantiles: the distribution-free order-statistic interval (the ranks between which the true q-quantile
  lies with the given confidence, from the binomial distribution of the count below it), read off the
  DDSketch buckets (1% relative accuracy, so each bound carries at most 1% of its value as extra error).
- Censoring: an answer that never came (an error or a timeout) is counted at the arm's timeout, as a
  lower bound of its latency, in a sketch of its own (``latc``) merged in here. Such values sit at the
  top of the distribution: an estimate that falls among them is itself a lower bound, and an upper
  interval bound that reaches them is unbounded.
- Cost: the ratio of mean costs over pairs priced on both arms, with a delta-method (linearised) normal
  interval from sums, sums of squares and cross-products: valid for large n, as any ratio estimator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .aggregate import MAPPING


@dataclass(frozen=True, slots=True)
class QuantileBounds:
    """A quantile's estimate and interval (ms); ``censored`` when the estimate is only a lower bound."""

    estimate: float | None
    low: float
    high: float
    n: int
    censored: bool


def _buckets(counters: Mapping[str, float], name: str, arm: str) -> list[tuple[float, float]]:
    prefix = f"sk:{name}:{arm}:"
    items = [
        (0.0 if key[len(prefix) :] == "z" else MAPPING.value(int(key[len(prefix) :])), count)
        for key, count in counters.items()
        if key.startswith(prefix) and count > 0
    ]
    return sorted(items)


def _value_at(buckets: list[tuple[float, float]], rank: int) -> float:
    """The value of the 0-based rank-th smallest observation."""
    seen = 0.0
    for value, count in buckets:
        seen += count
        if rank < seen:
            return value
    return buckets[-1][0]


def quantile_bounds(counters: Mapping[str, float], name: str, arm: str, q: float, confidence: float) -> QuantileBounds:
    """Order-statistic interval of the q-quantile of one arm's sketched metric, censoring-aware."""
    censored_buckets = _buckets(counters, name + "c", arm)  # answers that never came, at the arm's timeout
    buckets = sorted(_buckets(counters, name, arm) + censored_buckets)
    n = int(round(sum(count for _, count in buckets)))
    if n == 0:
        return QuantileBounds(None, -math.inf, math.inf, 0, False)
    censored = int(round(sum(count for _, count in censored_buckets)))
    first_censored = n - censored  # 0-based rank of the first value counted at a timeout
    tail = (1.0 - confidence) / 2.0
    # P(X_(r) <= x_q <= X_(s)) >= confidence for 1-based r = ppf(tail), s = ppf(1 - tail) + 1.
    r = int(stats.binom.ppf(tail, n, q))
    s = int(stats.binom.ppf(1.0 - tail, n, q)) + 1
    point = min(n - 1, max(0, math.ceil(q * n) - 1))
    low = _value_at(buckets, r - 1) if r >= 1 else 0.0
    high = _value_at(buckets, s - 1) if s <= n and s - 1 < first_censored else math.inf
    return QuantileBounds(_value_at(buckets, point), low, high, n, point >= first_censored)


def sketch_arrays(
    counters: Mapping[str, float], name: str, arm: str, *, censored: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted bucket values and cumulative counts of an arm's sketch with its censored one merged in;
    ``censored`` replaces the censored values (math.inf for an upper bound), else they stay at the timeout."""
    kept = _buckets(counters, name, arm)
    cut = _buckets(counters, name + "c", arm)
    if censored is not None:
        cut = [(censored, count) for _, count in cut]
    merged = sorted(kept + cut)
    values = np.array([v for v, _ in merged], dtype=float)
    return values, np.cumsum([c for _, c in merged], dtype=float)


@dataclass(frozen=True, slots=True)
class RatioBounds:
    estimate: float | None
    low: float
    high: float
    n: int


def cost_ratio_bounds(counters: Mapping[str, float], confidence: float) -> RatioBounds:
    """mean(candidate cost) / mean(incumbent cost) over pairs priced on both arms, delta-method interval."""
    n = counters.get("costp_n", 0.0)
    if n < 2:
        return RatioBounds(None, -math.inf, math.inf, int(n))
    mx, my = counters["costp_x"] / n, counters["costp_y"] / n
    if mx <= 0:
        return RatioBounds(None, -math.inf, math.inf, int(n))
    sxx = max(counters["costp_xx"] / n - mx * mx, 0.0) * n / (n - 1)
    syy = max(counters["costp_yy"] / n - my * my, 0.0) * n / (n - 1)
    sxy = (counters["costp_xy"] / n - mx * my) * n / (n - 1)
    ratio = my / mx
    variance = max(syy - 2 * ratio * sxy + ratio * ratio * sxx, 0.0) / (n * mx * mx)
    half = float(stats.norm.ppf(0.5 + confidence / 2.0)) * math.sqrt(variance)
    return RatioBounds(ratio, ratio - half, ratio + half, int(n))

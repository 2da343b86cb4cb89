"""The divergence gate: is the candidate's similarity to the incumbent worse than the incumbent's to itself?

Pure: two histograms of similarity scores in ``similarity.bucket`` buckets (bucket -> count, summed over
windows and segments), one for candidate-vs-incumbent pairs and one for incumbent-vs-incumbent (A/A) pairs,
in; a ``DivergenceResult`` out. ``docs/divergence.md`` says what the tests assume and how they were sized.

- tail, one per A/A quantile q (1% and 5% by default): t is the A/A's q-quantile of similarity; p_c and p_a
  are the shares of candidate and A/A pairs scoring below t. The excess p_c - p_a is tested against
  ``excess_pp`` with an interval that inverts an exact binomial test of the candidate's count, averaged over
  the exact (order statistic) distribution of the A/A's share below t. It catches a minority of materially
  different answers, which barely moves a mean. The low quantile has the power while the A/A pairs are few;
  the higher one keeps t above the incumbent's own occasional different answers, so that a pass holds.
- shift: the Hodges-Lehmann shift of candidate scores against A/A scores, with the Mann-Whitney (Moses)
  interval computed from the bucket counts, ties included, tested against ``-shift_max``.

The gate fails if any test fails and passes only if every test passes; the error rate 1 - confidence is split
equally between the tests (Bonferroni), so the gate's false fail is at most 1 - confidence. For a
deterministic incumbent (every A/A pair identical) every t is 1.0, p_a is 0 and the tail test is the
exact-match rate test of earlier versions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize, stats

from .similarity import BUCKETS, IDENTICAL, WIDTH

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
Histogram = Mapping[int, float]
_NODES = 256  # quadrature nodes over the distribution of the A/A's share below t
_HALF_UNITS = 2 * IDENTICAL  # scores on a half-bucket grid: bucket i < 200 sits at 2i + 1, identical at 400

STATISTIC = (
    "share of pairs less similar than the A/A's low quantiles, candidate - A/A (exact); "
    "Hodges-Lehmann similarity shift, candidate - A/A (Mann-Whitney)"
)


@dataclass(frozen=True, slots=True)
class DivergenceRule:
    """The gate's margins, quantiles and minimums (``compare.gates``)."""

    excess_pp: float = 5.0  # divergence_excess_pp: allowed excess share of pairs below an A/A low quantile
    shift_max: float = 0.05  # similarity_shift_max: allowed drop of the candidate's similarity (HL shift)
    quantiles: tuple[float, ...] = (0.01, 0.05)  # noise_quantiles: what "less similar than noise" means
    confidence: float = 0.95
    min_pairs: int = 100
    min_noise_pairs: int = 50

    def __post_init__(self) -> None:
        if not self.quantiles or not all(0.0 < q < 1.0 for q in self.quantiles):
            raise ValueError(f"noise quantiles must be one or more shares in (0, 1), not {self.quantiles!r}")


@dataclass(frozen=True, slots=True)
class DivergenceResult:
    """The gate's outcome and evidence; ``estimate`` and ``interval`` are those of the tail test (of the
    quantile) with the strongest evidence of an excess; ``details`` has every test."""

    outcome: str
    statistic: str
    estimate: float | None
    interval: tuple[float, float] | None
    threshold: float
    n: int
    n_aa: int
    rule: str
    need_more_pairs: int | None
    p_value: float | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """One test's decision: estimate, interval (each side at the test's share of the error rate), one-sided
    p-value of "the effect exceeds the threshold", and, when inconclusive, the pairs it still needs and
    whether its estimate is on the failing side of the threshold."""

    outcome: str
    estimate: float
    interval: tuple[float, float]
    p_value: float
    need_more: int | None
    leaning_fail: bool


def dense(hist: Histogram) -> npt.NDArray[np.int64]:
    """A bucket -> count map as a vector of BUCKETS integer counts (out-of-range buckets are clipped in)."""
    counts = np.zeros(BUCKETS, dtype=np.int64)
    for index, count in hist.items():
        counts[min(max(int(index), 0), IDENTICAL)] += round(count)
    return counts


def tail_counts(cand: Histogram, aa: Histogram, q: float) -> tuple[int, int, int, int, float]:
    """(k_c, n_c, k_a, n_a, t): pairs of each kind scoring below t, the A/A's q-quantile of similarity.

    t is the lower edge of the bucket holding the ceil(q * n_a)-th lowest A/A score, so "below t" is
    "in a lower bucket": ties with t never count, and k_a / n_a is below q. With no A/A pairs t is 1.0.
    """
    c, a = dense(cand), dense(aa)
    n_a = int(a.sum())
    rank = max(1, math.ceil(q * n_a - 1e-9))
    edge = int(np.searchsorted(np.cumsum(a), rank)) if n_a else IDENTICAL
    return int(c[:edge].sum()), int(c.sum()), int(a[:edge].sum()), n_a, edge * WIDTH


def evaluate(cand: Histogram, aa: Histogram, rule: DivergenceRule) -> DivergenceResult:
    """The divergence gate on candidate-vs-incumbent and A/A similarity histograms."""
    n_c, n_a = int(dense(cand).sum()), int(dense(aa).sum())
    threshold = rule.excess_pp / 100.0
    details: dict[str, Any] = _shares(cand, aa) | {"shift_max": rule.shift_max}
    if n_c == 0 or n_a == 0:
        reason = "no candidate pairs compared" if n_c == 0 else _NO_NOISE
        need = rule.min_pairs - n_c if n_c < rule.min_pairs else None  # the A/A share is unknown yet
        return DivergenceResult(INCONCLUSIVE, STATISTIC, None, None, threshold, n_c, n_a, reason, need, None, details)
    side = (1.0 - rule.confidence) / (len(rule.quantiles) + 1)  # each test's one-sided error rate
    tails = {q: tail_test(*tail_counts(cand, aa, q)[:4], threshold, side) for q in rule.quantiles}
    shift = shift_test(dense(cand), dense(aa), rule.shift_max, side)
    q, lead = min(tails.items(), key=lambda item: item[1].p_value)
    k_c, _, k_a, _, t = tail_counts(cand, aa, q)
    details |= {"t": t, "quantile": q, "k_c": k_c, "k_a": k_a, "p_c": k_c / n_c, "p_a": k_a / n_a}
    details |= {"tails": [_tail_details(q, cand, aa, test) for q, test in tails.items()]}
    details |= {"shift": shift.estimate, "shift_interval": shift.interval, "shift_outcome": shift.outcome}
    details |= {"shift_p_value": shift.p_value, "interval_level": 1.0 - 2.0 * side}
    tests = [*tails.values(), shift]
    outcome, need, text = _decide(tests, rule, n_c, n_a, _words(tails, shift, rule))
    p_value = min(1.0, len(tests) * min(test.p_value for test in tests))  # Bonferroni, as the fail rule
    return DivergenceResult(
        outcome, STATISTIC, lead.estimate, lead.interval, threshold, n_c, n_a, text, need, p_value, details
    )


_NO_NOISE = (
    "no A/A noise pairs (incumbent vs a second incumbent answer): the incumbent's own variability is unknown; "
    "sample them with compare.noise_sample_rate"
)


def _decide(tests: list[Decision], rule: DivergenceRule, n_c: int, n_a: int, words: str) -> tuple[str, int | None, str]:
    """The gate's outcome, the pairs it still needs and its rule in words (the minimums first)."""
    if n_a < rule.min_noise_pairs or n_c < rule.min_pairs:
        # A/A pairs keep coming at their current share of the candidate's pairs.
        need = max(math.ceil((rule.min_noise_pairs - n_a) * n_c / n_a), rule.min_pairs - n_c)
        short = f"{n_a} A/A pairs (minimum {rule.min_noise_pairs}) and {n_c} pairs (minimum {rule.min_pairs})"
        return INCONCLUSIVE, need, f"too few to decide: {short}; {words}"
    outcomes = [test.outcome for test in tests]
    if FAIL in outcomes:
        return FAIL, None, words
    if all(outcome == PASS for outcome in outcomes):
        return PASS, None, words
    # One failing test fails the gate, a pass needs them all: the nearest fail, else the furthest pass.
    open_tests = [(t.need_more, t.leaning_fail) for t in tests if t.outcome == INCONCLUSIVE and t.need_more is not None]
    failing = [need for need, leaning_fail in open_tests if leaning_fail]
    passing = [need for need, leaning_fail in open_tests if not leaning_fail]
    return INCONCLUSIVE, min(failing) if failing else max(passing, default=None), words


def _words(tails: dict[float, Decision], shift: Decision, rule: DivergenceRule) -> str:
    parts = [
        f"below A/A {q:.0%}: excess {t.estimate:+.1%} [{t.interval[0]:+.1%}, {t.interval[1]:+.1%}] {t.outcome}"
        for q, t in tails.items()
    ]
    low, high = shift.interval
    parts.append(f"shift {shift.estimate:+.3f} [{low:+.3f}, {high:+.3f}] {shift.outcome}")
    return "; ".join(parts) + f" (limits {rule.excess_pp:g} pp, -{rule.shift_max:g})"


def _tail_details(q: float, cand: Histogram, aa: Histogram, test: Decision) -> dict[str, Any]:
    k_c, n_c, k_a, n_a, t = tail_counts(cand, aa, q)
    return {
        "quantile": q,
        "t": t,
        "p_c": k_c / n_c,
        "p_a": k_a / n_a,
        "excess": test.estimate,
        "interval": test.interval,
        "outcome": test.outcome,
        "p_value": test.p_value,
    }


def _shares(cand: Histogram, aa: Histogram) -> dict[str, Any]:
    """Share of identical pairs (the exact-match rate, kept as a figure) and mean similarity of each kind."""
    out: dict[str, Any] = {}
    values = np.append((np.arange(IDENTICAL) + 0.5) * WIDTH, 1.0)  # bucket midpoints; identical is 1.0
    for name, hist in (("candidate", cand), ("aa", aa)):
        counts = dense(hist)
        n = int(counts.sum())
        out[f"identical_share_{name}"] = float(counts[IDENTICAL] / n) if n else None
        out[f"mean_similarity_{name}"] = float(counts @ values / n) if n else None
    return out


# --- tail test -------------------------------------------------------------------------------------------


def tail_test(k_c: int, n_c: int, k_a: int, n_a: int, threshold: float, side: float) -> Decision:
    """Excess p_c - p_a of the shares below t, each bound at one-sided error ``side``, against ``threshold``.

    Given t the candidate's count is binomial. The A/A's true share below t, F_a(t), is that below the k-th
    lowest of n_a A/A scores: Beta(k, n_a - k + 1) for continuous scores, whose quantiles are the
    Clopper-Pearson bounds of k_a = k - 1 (conservative with ties). Each bound of the excess inverts the exact
    binomial test of k_c averaged over that distribution (a Beta-binomial mixture).
    """
    upper_share = _nodes(k_a + 1, n_a - k_a)  # F_a(t) as large as it may be: the fail side
    lower_share = _nodes(k_a, n_a - k_a + 1) if k_a else np.zeros(1)  # as small as it may be: the pass side

    def p_fail(d: float) -> float:  # P(count >= k_c) were the excess d: small when the excess exceeds d
        return float(np.mean(stats.binom.sf(k_c - 1, n_c, np.clip(upper_share + d, 0.0, 1.0))))

    def p_pass(d: float) -> float:  # P(count <= k_c) were the excess d: small when the excess is below d
        return float(np.mean(stats.binom.cdf(k_c, n_c, np.clip(lower_share + d, 0.0, 1.0))))

    # The excess is at least -F_a(t) (no candidate pair below t) and at most 1 - F_a(t).
    low = max(_root(lambda d: p_fail(d) - side), -float(stats.beta.ppf(1 - side, k_a + 1, n_a - k_a)))
    high = min(_root(lambda d: side - p_pass(d)), 1.0 - float(np.min(lower_share)))
    estimate = k_c / n_c - k_a / n_a
    outcome = FAIL if low > threshold else PASS if high <= threshold else INCONCLUSIVE
    need = _need_more(n_c, estimate, (low, high), threshold) if outcome == INCONCLUSIVE else None
    return Decision(outcome, estimate, (round(low, 6), round(high, 6)), p_fail(threshold), need, estimate > threshold)


def _nodes(a: float, b: float) -> npt.NDArray[np.float64]:
    """Equal-mass quadrature nodes of Beta(a, b): the medians of _NODES quantile slices."""
    return np.asarray(stats.beta.ppf((np.arange(_NODES) + 0.5) / _NODES, a, b), dtype=np.float64)


def _root(increasing: Callable[[float], float]) -> float:
    """Where an increasing function of the excess crosses 0 in [-1, 1] (an end when it does not)."""
    if increasing(-1.0) >= 0:
        return -1.0
    if increasing(1.0) <= 0:
        return 1.0
    return float(optimize.brentq(increasing, -1.0, 1.0, xtol=1e-6))


def _need_more(n: int, estimate: float, interval: tuple[float, float], threshold: float) -> int | None:
    """More candidate pairs (A/A pairs growing at their current share) for the interval to clear the threshold,
    the side facing it narrowing as 1 / sqrt(n)."""
    side = estimate - interval[0] if estimate > threshold else interval[1] - estimate
    margin = abs(estimate - threshold)
    if margin <= 1e-12 or side <= 0:
        return None
    return max(1, math.ceil(n * (side / margin) ** 2 - n))


# --- shift test ------------------------------------------------------------------------------------------


def shift_test(cand: npt.NDArray[np.int64], aa: npt.NDArray[np.int64], shift_max: float, side: float) -> Decision:
    """Hodges-Lehmann shift (candidate - A/A similarity), Moses interval at one-sided ``side``, against
    -shift_max.

    From bucket counts: the pairwise differences are the convolution of the two histograms on a half-bucket
    grid, so the estimate and the interval's order statistics are exact for bucketed scores; the rank
    statistic's variance has the tie correction of the pooled counts.
    """
    n_c, n_a = int(cand.sum()), int(aa.sum())
    weights = np.convolve(_on_grid(cand), _on_grid(aa)[::-1]).astype(np.float64)  # i: difference i - 400
    cumulative = np.cumsum(weights)
    total = float(n_c) * n_a
    sd = math.sqrt(_u_variance(cand + aa, n_c, n_a))

    def difference(rank: float) -> float:  # the rank-th smallest pairwise difference (1-based)
        return float((np.searchsorted(cumulative, rank - 0.5) - _HALF_UNITS) * WIDTH / 2)

    middle = (total + 1) / 2  # the median: one order statistic, or the mean of the two around it
    estimate = (difference(math.floor(middle)) + difference(math.ceil(middle))) / 2
    c = math.floor(total / 2 - float(stats.norm.ppf(1 - side)) * sd)
    interval = (difference(c), difference(total - c + 1)) if c >= 1 else (-1.0, 1.0)
    outcome = FAIL if interval[1] < -shift_max else PASS if interval[0] >= -shift_max else INCONCLUSIVE
    need = _need_more(n_c, estimate, interval, -shift_max) if outcome == INCONCLUSIVE else None
    p_value = _shift_p(weights, total, sd, shift_max)
    return Decision(outcome, estimate, interval, p_value, need, estimate < -shift_max)


def _on_grid(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Bucket counts on the half-bucket grid (bucket i < 200 at 2i + 1, identical at 400)."""
    grid = np.zeros(_HALF_UNITS + 1, dtype=np.int64)
    grid[2 * np.arange(IDENTICAL) + 1] = counts[:IDENTICAL]
    grid[_HALF_UNITS] = counts[IDENTICAL]
    return grid


def _u_variance(pooled: npt.NDArray[np.int64], n_c: int, n_a: int) -> float:
    """Variance of the Mann-Whitney U statistic under exchangeability, corrected for ties."""
    n = n_c + n_a
    if n < 2:
        return 0.0
    ties = float(np.sum(pooled.astype(np.float64) ** 3 - pooled))
    return max(0.0, n_c * n_a / 12.0 * ((n + 1) - ties / (n * (n - 1))))


def _shift_p(weights: npt.NDArray[np.float64], total: float, sd: float, shift_max: float) -> float:
    """One-sided p-value of "shift >= -shift_max": small when the candidate is less similar by more than it."""
    bound = _HALF_UNITS + round(-shift_max / (WIDTH / 2))  # grid index of the difference -shift_max
    above = float(weights[bound + 1 :].sum()) + 0.5 * float(weights[bound]) if 0 <= bound < len(weights) else 0.0
    if sd == 0.0:
        return 0.0 if above < total / 2 else 1.0
    return float(stats.norm.cdf((above - total / 2) / sd))

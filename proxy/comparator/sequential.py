"""Always-valid confidence sequences (CS) for a canary that re-tests its gates as data arrives.

A level-a CS holds the true value at every sample size at once, P(exists t: value not in CS_t) <= a, so the
controller may look at every interval and act on the first look that decides. Pure numpy and scipy over the
aggregate's counters; every function broadcasts over arrays (looks, simulated streams).

- Means: the asymptotic CS of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (Ann. Statist. 2024), mean +-
  sd * margin(t): Robbins' two-sided normal mixture with the sample variance plugged in, tightest near t_star
  (the mixing variance of confseq and drconfseq). Finite from MIN_N values on.
- Proportions and quantile ranks: the conjugate beta-binomial mixture (confseq's BetaBinomialMixture, Howard
  et al. 2021), exact at every n from the first.
- Paired error-rate difference: the asymptotic CS with a score-type variance floor, so a few discordant
  pairs cannot make it narrow.
Invariant: every (low, high) holds at the level it was asked for; `split_alpha` gives each gate the levels
of its failing and passing bounds so that, however often the controller looks, a whole canary rolls back a
good candidate, or advances a bad one, with probability at most alpha (docs/sequential.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import betaln

Floats: TypeAlias = NDArray[np.float64]
Interval: TypeAlias = tuple[Floats, Floats]

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
DEFAULT_T_STAR = 2000
METHOD = "confidence sequence (always valid under continuous monitoring)"
_BISECTIONS = 44  # halves [0, 1] to ~6e-14: far below any count or rate we report
_EPS = 1e-12
MIN_N = 30  # values before an asymptotic (variance plug-in) CS is finite


def _f(x: ArrayLike) -> Floats:
    return np.asarray(x, dtype=np.float64)


def mixing_variance(alpha: float, t_star: float) -> float:
    """rho^2 of the normal mixture that makes the CS tightest near t_star observations.

    (2 log(1/a) + log(1 + 2 log(1/a))) / t_star: confseq's TwoSidedNormalMixture.best_rho (its rho is
    1 / rho^2 here); drconfseq's exact Lambert-W optimum differs by about 3%.
    """
    log_inv = math.log(1.0 / alpha)
    return (2.0 * log_inv + math.log(1.0 + 2.0 * log_inv)) / t_star


def margin(t: ArrayLike, alpha: float, t_star: float = DEFAULT_T_STAR) -> Floats:
    """Half-width of the CS for a mean of t unit-variance observations (infinite below one).

    sqrt(2 (t rho^2 + 1) / (t^2 rho^2) * log(sqrt(t rho^2 + 1) / alpha)): two-sided at level alpha.
    """
    t = _f(t)
    rho2 = mixing_variance(alpha, t_star)
    safe = np.maximum(t, 1.0)
    half = np.sqrt(2.0 * (safe * rho2 + 1.0) / (safe * safe * rho2) * np.log(np.sqrt(safe * rho2 + 1.0) / alpha))
    return np.where(t >= 1.0, half, np.inf)


def mean_cs(
    n: ArrayLike, total: ArrayLike, total_sq: ArrayLike, alpha: float, t_star: float, *, min_n: int = MIN_N
) -> Interval:
    """CS for a mean from n, sum and sum of squares: asymptotic, so the whole line below min_n values.

    The sample variance of skewed data runs low in small samples, and small alphas sit far in the tail
    where the normal approximation is worst: see docs/sequential.md for the measured misses.
    """
    n = _f(n)
    safe = np.maximum(n, 2.0)
    mean = _f(total) / np.maximum(n, 1.0)
    var = np.maximum((_f(total_sq) - safe * mean * mean) / (safe - 1.0), 0.0)
    half = np.where(n >= max(min_n, 2), np.sqrt(var) * margin(safe, alpha, t_star), np.inf)
    return mean - half, mean + half


def _bisect(outside: Callable[[Floats], NDArray[np.bool_]], inner: Floats, outer: Floats) -> Floats:
    """The edge of a set between `inner` (in it) and `outer` (not), elementwise; errs on the outer side."""
    for _ in range(_BISECTIONS):
        mid = (inner + outer) / 2.0
        out = outside(mid)
        outer = np.where(out, mid, outer)
        inner = np.where(out, inner, mid)
    return outer


def _log_beta_binomial(n: Floats, k: Floats, p: Floats, alpha: float, t_star: float) -> Floats:
    """log of the beta-binomial mixture martingale testing P(success) = p after k successes in n.

    A Beta prior of mean p and prior size 1 / rho^2 - 1 (confseq's two-sided BetaBinomialMixture with
    g = p, h = 1 - p): a likelihood ratio with expectation 1 under p, so Ville's inequality applies exactly.
    """
    size = max(1.0 / mixing_variance(alpha, t_star) - 1.0, 1e-3)
    a, b = size * p, size * (1.0 - p)
    return np.asarray(betaln(k + a, n - k + b) - betaln(a, b) - k * np.log(p) - (n - k) * np.log1p(-p))


def proportion_cs(n: ArrayLike, k: ArrayLike, alpha: float, t_star: float) -> Interval:
    """Exact CS for a success probability after k successes in n trials: {p : mixture < 1/alpha}."""
    n, k = np.broadcast_arrays(_f(n), _f(k))
    pairs, where = np.unique(np.stack([n.ravel(), k.ravel()]), axis=1, return_inverse=True)  # streams repeat (n, k)
    low, high = _proportion_bounds(pairs[0], pairs[1], alpha, t_star)
    return low[where.reshape(-1)].reshape(n.shape), high[where.reshape(-1)].reshape(n.shape)


def _proportion_bounds(n: Floats, k: Floats, alpha: float, t_star: float) -> Interval:
    level = math.log(1.0 / alpha)
    phat = np.clip(k / np.maximum(n, 1.0), _EPS, 1.0 - _EPS)

    def outside(p: Floats) -> NDArray[np.bool_]:
        return _log_beta_binomial(n, k, p, alpha, t_star) >= level

    low = _bisect(outside, phat, np.full_like(phat, _EPS))
    high = _bisect(outside, phat, np.full_like(phat, 1.0 - _EPS))
    return np.where(k <= 0, 0.0, low), np.where(k >= n, 1.0, high)


def _score_upper(center: Floats, m2: Floats) -> Floats:
    """Largest d with (center - d)^2 <= m2 * d * (1 - d): a Wilson bound (-inf when there is none)."""
    b = 2.0 * center + m2
    disc = b * b - 4.0 * (1.0 + m2) * center * center
    return np.where(disc >= 0.0, (b + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * (1.0 + m2)), -np.inf)


def paired_difference_cs(
    n: ArrayLike, cand_only: ArrayLike, inc_only: ArrayLike, alpha: float, t_star: float
) -> Interval:
    """CS for p_cand - p_inc from discordant pairs: the mean of D = err_cand - err_inc in {-1, 0, 1}.

    The variance is at least |d| (1 - |d|) at any tested difference d (the least a three-point variable
    with that mean can have), so a few discordant pairs cannot give a narrow CS on either side.
    """
    n, b, c = np.broadcast_arrays(_f(n), _f(cand_only), _f(inc_only))
    safe = np.maximum(n, 1.0)
    d = (b - c) / safe
    sd = np.sqrt(np.maximum((b + c) / safe - d * d, 0.0))
    m = margin(safe, alpha, t_star)
    high = np.maximum(d + m * sd, _score_upper(d, m * m))
    low = np.minimum(d - m * sd, -_score_upper(-d, m * m))
    return np.where(n >= 1.0, np.clip(low, -1.0, 1.0), -1.0), np.where(n >= 1.0, np.clip(high, -1.0, 1.0), 1.0)


def difference(a: Interval, b: Interval) -> Interval:
    """CS for b - a from a CS of each (each at half the level: Bonferroni)."""
    return b[0] - a[1], b[1] - a[0]


def two_sample_cs(
    a: tuple[ArrayLike, ArrayLike, ArrayLike],
    b: tuple[ArrayLike, ArrayLike, ArrayLike],
    alpha: float,
    t_star: float,
    *,
    min_n: int = MIN_N,
) -> Interval:
    """CS for mean(b) - mean(a) of two independent samples, each given as (n, sum, sum of squares)."""
    half = alpha / 2.0
    return difference(mean_cs(*a, half, t_star, min_n=min_n), mean_cs(*b, half, t_star, min_n=min_n))


def two_proportion_cs(
    a: tuple[ArrayLike, ArrayLike], b: tuple[ArrayLike, ArrayLike], alpha: float, t_star: float
) -> Interval:
    """CS for p_b - p_a of two independent samples, each given as (n, successes); exact."""
    return difference(proportion_cs(*a, alpha / 2.0, t_star), proportion_cs(*b, alpha / 2.0, t_star))


def rank_bounds(n: ArrayLike, q: float, alpha: float, t_star: float) -> Interval:
    """Exact CS for the count of observations at or below the true q-quantile among n (continuous bounds).

    For a continuous distribution that count is Binomial(n, q) whatever the distribution: no estimate needed.
    """
    n = _f(n)
    level = math.log(1.0 / alpha)
    q_arr = np.full_like(n, q)

    def outside(k: Floats) -> NDArray[np.bool_]:
        return _log_beta_binomial(n, k, q_arr, alpha, t_star) >= level

    low = np.where(outside(np.zeros_like(n)), _bisect(outside, n * q, np.zeros_like(n)), 0.0)
    high = np.where(outside(n), _bisect(outside, n * q, n.copy()), n)
    return low, high


def _order_statistic(values: Floats, cumulative: Floats, rank: Floats, outside: float) -> Floats:
    """The rank-th smallest observation (1-based); `outside` where the rank is not in 1..n."""
    n = cumulative[..., -1]
    index = np.sum(cumulative < rank[..., None], axis=-1)
    picked = values[np.minimum(index, len(values) - 1)]
    return np.where((rank >= 1) & (rank <= n), picked, outside)


def quantile_cs(
    values: ArrayLike,
    cumulative: ArrayLike,
    q: float,
    alpha: float,
    t_star: float,
    *,
    relative_accuracy: float = 0.0,
) -> Interval:
    """CS for the q-quantile from a histogram: bucket values sorted ascending, cumulative counts over them.

    With k the count at or below the true quantile x_q, k >= r implies X_(r) <= x_q and k <= m implies
    X_(m+1) > x_q, so the exact rank CS maps to [X_(ceil(low)), X_(floor(high) + 1)]. `relative_accuracy`
    widens by the sketch's bucket error (a DDSketch value is within that fraction of what it stands for).
    `cumulative` may carry leading axes (looks, streams); its last entry along the last axis is n.
    """
    vals, cum = _f(values), _f(cumulative)
    sizes, where = np.unique(cum[..., -1], return_inverse=True)  # looks share n: bound each n once
    low_rank, high_rank = (bound[where].reshape(cum.shape[:-1]) for bound in rank_bounds(sizes, q, alpha, t_star))
    low = _order_statistic(vals, cum, np.ceil(low_rank), -np.inf)
    high = _order_statistic(vals, cum, np.floor(high_rank) + 1.0, np.inf)
    return low / (1.0 + relative_accuracy), high / (1.0 - relative_accuracy)


def quantile_excess_cs(a: Interval, b: Interval, *, increase_pct: float = 0.0, min_effect: float = 0.0) -> Interval:
    """CS for Q_b - Q_a - max(min_effect, increase_pct% of Q_a) from each arm's quantile CS (each at alpha/2).

    The allowance grows with Q_a, so the worst cases sit at the corners of the two CSs.
    """

    def allowed(qa: Floats) -> Floats:
        return qa + np.maximum(min_effect, qa * increase_pct / 100.0)

    return b[0] - allowed(a[1]), b[1] - allowed(a[0])


def ratio_cs(
    n: ArrayLike,
    sum_x: ArrayLike,
    sum_y: ArrayLike,
    sum_xx: ArrayLike,
    sum_yy: ArrayLike,
    sum_xy: ArrayLike,
    alpha: float,
    t_star: float,
    *,
    min_n: int = MIN_N,
) -> Interval:
    """CS for mean(y) / mean(x) over pairs (cost: y candidate, x incumbent), Fieller-style.

    R is kept when the CS for the mean of y - R x holds 0: the linearised test at each R, so comparing this
    CS with a threshold R0 is exactly the test of mean(y - R0 x) <= 0. The whole line while the
    denominator's CS still holds 0, and below min_n pairs.
    """
    n = _f(n)
    safe = np.maximum(n, 2.0)
    mx, my = _f(sum_x) / safe, _f(sum_y) / safe
    sxx = (_f(sum_xx) - safe * mx * mx) / (safe - 1.0)
    syy = (_f(sum_yy) - safe * my * my) / (safe - 1.0)
    sxy = (_f(sum_xy) - safe * mx * my) / (safe - 1.0)
    m2 = margin(safe, alpha, t_star) ** 2
    lead = mx * mx - m2 * sxx
    half_b = mx * my - m2 * sxy
    disc = np.sqrt(np.maximum(half_b * half_b - lead * (my * my - m2 * syy), 0.0))
    bounded = (lead > 0.0) & (n >= max(min_n, 2))
    safe_lead = np.where(bounded, lead, 1.0)
    return (
        np.where(bounded, (half_b - disc) / safe_lead, -np.inf),
        np.where(bounded, (half_b + disc) / safe_lead, np.inf),
    )


@dataclass(frozen=True, slots=True)
class AlphaPlan:
    """Each gate's bound that can fail it and the one that can pass it, at levels that hold over a canary.

    Fail side: a good candidate can be failed at any gate of any stage, each a fresh chance, so Bonferroni
    over gates x stages. Pass side: a stage advances only when every gate it watches passes and holds while
    one is inconclusive, so any advance of a candidate bad at some gate goes through a false pass at the
    first stage where it is bad: Bonferroni over gates only. Each side is a CS's one side at that level.
    """

    alpha: float
    gates: int
    stages: int

    @property
    def fail_alpha(self) -> float:
        """Level of the bound that can fail a gate, per gate and stage."""
        return self.alpha / (self.gates * self.stages)

    @property
    def pass_alpha(self) -> float:
        """Level of the bound that can pass a gate, per gate."""
        return self.alpha / self.gates

    def describe(self) -> str:
        return (
            f"alpha {self.alpha:g} over {self.stages} stage(s) x {self.gates} gate(s): failing bounds at "
            f"{self.fail_alpha:.3g}, passing bounds at {self.pass_alpha:.3g} (two-arm gates: half per arm); "
            f"false rollback and false advance each <= {self.alpha:g} however often the controller looks"
        )


def split_alpha(alpha: float, gates: int, stages: int) -> AlphaPlan:
    """The levels each gate's bounds need so a whole canary errs either way with probability <= alpha."""
    if not 0.0 < alpha < 1.0 or gates < 1 or stages < 1:
        raise ValueError("split_alpha needs 0 < alpha < 1 and at least one gate and one stage")
    return AlphaPlan(alpha, gates, stages)


def gate_cs(cs: Callable[[float], Interval], plan: AlphaPlan, *, higher_is_worse: bool = True) -> Interval:
    """(low, high) for a gate: the side that can fail it from cs(plan.fail_alpha), the other from cs(plan.pass_alpha).

    A two-sided CS at level a misses on one given side with probability <= a, so each bound holds at its
    own level (conservatively: a one-sided mixture would be a little narrower).
    """
    failing, passing = cs(plan.fail_alpha), cs(plan.pass_alpha)
    return (failing[0], passing[1]) if higher_is_worse else (passing[0], failing[1])


def pairs_needed(n: float, half_width: float, distance: float, alpha: float, t_star: float) -> int | None:
    """More pairs until the CS half-width, shrinking as margin(t), reaches `distance` (None: never).

    The half-width is assumed to scale like margin(t) at the current variance: the CS's own shape, not
    1 / sqrt(n).
    """
    if not (distance > 0.0 and math.isfinite(half_width) and n >= 1):
        return None
    if half_width <= distance:
        return 0
    target = float(margin(n, alpha, t_star)) * distance / half_width
    if float(margin(1e12, alpha, t_star)) > target:
        return None
    t = float(np.exp(_bisect(lambda lt: margin(np.exp(lt), alpha, t_star) <= target, _f(math.log(n)), _f(27.7))))
    return max(1, math.ceil(t - n))


@dataclass(frozen=True, slots=True)
class Decision:
    """A gate's outcome from its CS, with the rule that gave it."""

    outcome: str
    rule: str
    need_more_pairs: int | None = None


def decide(
    low: float,
    high: float,
    threshold: float,
    *,
    n: int,
    min_pairs: int,
    plan: AlphaPlan,
    t_star: float,
    estimate: float | None = None,
    higher_is_worse: bool = True,
) -> Decision:
    """fail: the CS wholly on the bad side; pass: wholly on the good side with n >= min_pairs; else wait.

    (low, high) as `gate_cs` gives them; the wait is the pairs the side heading for the threshold needs.
    """
    sign = 1.0 if higher_is_worse else -1.0
    lo, hi, thr = (low, high, threshold) if higher_is_worse else (-high, -low, -threshold)
    shown = f"confidence sequence [{low:.4g}, {high:.4g}]"
    if lo > thr:
        return Decision(FAIL, f"{shown} wholly on the bad side of {threshold:.4g}")
    if hi <= thr and n >= min_pairs:
        return Decision(PASS, f"{shown} wholly on the good side of {threshold:.4g}")
    if hi <= thr:
        return Decision(INCONCLUSIVE, f"n={n} below the gate minimum of {min_pairs} pairs", min_pairs - n)
    if estimate is None and not (math.isfinite(lo) and math.isfinite(hi)):
        return Decision(INCONCLUSIVE, f"{shown} straddles the threshold {threshold:.4g}")
    centre = sign * estimate if estimate is not None else (lo + hi) / 2.0
    if centre > thr:  # heading for a fail: the failing bound must cross
        need = pairs_needed(n, centre - lo, centre - thr, plan.fail_alpha, t_star)
    else:
        need = pairs_needed(n, hi - centre, thr - centre, plan.pass_alpha, t_star)
    return Decision(INCONCLUSIVE, f"{shown} straddles the threshold {threshold:.4g}", need)

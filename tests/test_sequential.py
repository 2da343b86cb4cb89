"""Confidence sequences as the canary uses them: coverage at every look, false rollbacks over a whole canary on
A/A data against the naive fixed-sample rule, power against planted regressions, and small samples.

Pure, seeded and vectorised (numpy over streams x looks): no event loop, no Redis. Each simulation prints its
measured rate so `pytest -s` shows the figures quoted in docs/sequential.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from proxy.comparator import sequential as sq

ALPHA = 0.05
T_STAR = 2000
PLAN = sq.split_alpha(ALPHA, gates=4, stages=6)
STEP, LOOKS = 50, 40  # pairs per evaluate interval, looks per stage
MEDIAN_MS, SIGMA = 800.0, 0.5  # lognormal latency of an LLM call
ACCURACY = 0.01  # the aggregate's DDSketch relative accuracy
GAMMA = (1 + ACCURACY) / (1 - ACCURACY)
KEYS = np.arange(
    math.floor(math.log(MEDIAN_MS * math.exp(-5 * SIGMA)) / math.log(GAMMA)),
    math.ceil(math.log(1.5 * MEDIAN_MS * math.exp(5 * SIGMA)) / math.log(GAMMA)) + 1,
)
VALUES = 2 * GAMMA**KEYS / (GAMMA + 1)  # each bucket's representative value, as DDSketch's mapping gives it


def _sizes(step: int, looks: int) -> np.ndarray:
    return np.arange(1, looks + 1) * step


def _bernoulli(rng: np.random.Generator, p: float, *, streams: int, step: int, looks: int) -> np.ndarray:
    """Cumulative successes at each look of each stream."""
    return rng.binomial(step, p, size=(streams, looks)).cumsum(axis=1)


def _error_pairs(
    rng: np.random.Generator,
    cand_only: float,
    inc_only: float,
    both: float = 0.0,
    *,
    streams: int,
    step: int,
    looks: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (candidate-only, incumbent-only, both) error pairs at each look."""
    cells = [cand_only, inc_only, both, 1 - cand_only - inc_only - both]
    counts = rng.multinomial(step, cells, size=(streams, looks)).cumsum(axis=1)
    return counts[..., 0], counts[..., 1], counts[..., 2]


def _discordant(
    rng: np.random.Generator, cand_only: float, inc_only: float, *, streams: int, step: int, looks: int
) -> tuple[np.ndarray, np.ndarray]:
    b, c, _ = _error_pairs(rng, cand_only, inc_only, streams=streams, step=step, looks=looks)
    return b, c


def _histograms(rng: np.random.Generator, *, streams: int, step: int, looks: int, scale: float = 1.0) -> np.ndarray:
    """Cumulative 1% bucket counts (streams, looks, buckets) of lognormal latencies, merged as the aggregate does."""
    latency = scale * rng.lognormal(math.log(MEDIAN_MS), SIGMA, size=(streams, step * looks))
    bucket = np.clip(np.ceil(np.log(latency) / math.log(GAMMA)).astype(np.int64) - KEYS[0], 0, len(KEYS) - 1)
    cell = (np.arange(streams)[:, None] * looks + np.arange(step * looks)[None, :] // step) * len(KEYS) + bucket
    counts = np.bincount(cell.ravel(), minlength=streams * looks * len(KEYS)).reshape(streams, looks, len(KEYS))
    return counts.cumsum(axis=1).cumsum(axis=2)


def _quantile(cumulative: np.ndarray, q: float, alpha: float) -> sq.Interval:
    return sq.quantile_cs(VALUES, cumulative, q, alpha, T_STAR, relative_accuracy=ACCURACY)


def _ever(missed: np.ndarray) -> float:
    return float(missed.any(axis=-1).mean())


# (i) coverage at every look: every 50 pairs up to 20,000


@pytest.mark.parametrize("p", [0.02, 0.3])
def test_a_proportion_cs_holds_the_true_rate_at_every_look(p: float) -> None:
    """Over 1,000 Bernoulli streams looked at every 50 pairs up to 20,000, the CS ever misses p in <= alpha."""
    rng = np.random.default_rng(11)
    k = _bernoulli(rng, p, streams=1000, step=50, looks=400)
    low, high = sq.proportion_cs(_sizes(50, 400), k, ALPHA, T_STAR)
    missed = _ever((low > p) | (high < p))
    print(f"proportion p={p}: ever missed in {missed:.2%} of streams")
    assert missed <= ALPHA


def test_the_paired_error_difference_cs_holds_zero_on_aa_errors_at_every_look() -> None:
    """Both arms erring on 2% of pairs independently: the CS of the difference ever misses 0 in <= alpha."""
    rng = np.random.default_rng(12)
    b, c = _discordant(rng, 0.02 * 0.98, 0.02 * 0.98, streams=1000, step=50, looks=400)
    low, high = sq.paired_difference_cs(_sizes(50, 400), b, c, ALPHA, T_STAR)
    missed = _ever((low > 0) | (high < 0))
    print(f"paired difference, A/A at 2%: ever missed in {missed:.2%}")
    assert missed <= ALPHA


def test_the_paired_error_difference_cs_holds_a_skewed_difference_at_every_look() -> None:
    """A candidate erring on 1% more pairs, the incumbent on none (D is a rare Bernoulli): still <= alpha."""
    rng = np.random.default_rng(13)
    b, c = _discordant(rng, 0.01, 0.0, streams=1000, step=50, looks=400)
    low, high = sq.paired_difference_cs(_sizes(50, 400), b, c, ALPHA, T_STAR)
    missed = _ever((low > 0.01) | (high < 0.01))
    print(f"paired difference, +1 pp on a zero baseline: ever missed in {missed:.2%}")
    assert missed <= ALPHA


def test_the_mean_cs_holds_the_mean_latency_at_every_look() -> None:
    """Lognormal latencies (sigma 0.5): the asymptotic CS ever misses the true mean in <= alpha of 1,000 streams."""
    rng = np.random.default_rng(14)
    latency = rng.lognormal(math.log(MEDIAN_MS), SIGMA, size=(1000, 20_000))
    at = _sizes(50, 400) - 1
    low, high = sq.mean_cs(at + 1, latency.cumsum(axis=1)[:, at], (latency**2).cumsum(axis=1)[:, at], ALPHA, T_STAR)
    mean = MEDIAN_MS * math.exp(SIGMA**2 / 2)
    missed = _ever((low > mean) | (high < mean))
    print(f"mean latency: ever missed in {missed:.2%}")
    assert missed <= ALPHA


@pytest.mark.parametrize("q", [0.5, 0.99])
def test_a_quantile_cs_from_sketch_buckets_holds_the_true_quantile_at_every_look(q: float) -> None:
    """Lognormal latencies merged into 1% buckets: the CS ever misses the true quantile in <= alpha of streams."""
    rng = np.random.default_rng(15)
    true = MEDIAN_MS * math.exp(SIGMA * stats.norm.ppf(q))
    missed = []
    for _ in range(10):  # 10 x 100 streams keeps the (streams, looks, buckets) array small
        low, high = _quantile(_histograms(rng, streams=100, step=50, looks=400), q, ALPHA)
        missed.append(((low > true) | (high < true)).any(axis=1))
    rate = float(np.mean(missed))
    print(f"quantile q={q}: ever missed in {rate:.2%}")
    assert rate <= ALPHA


# (ii) the controller's rule on A/A data


def _clopper_pearson(k: np.ndarray, n: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    n = np.broadcast_to(n, k.shape)
    tail = (1 - confidence) / 2
    low = np.where(k > 0, stats.beta.ppf(tail, np.maximum(k, 1), n - k + 1), 0.0)
    high = np.where(k < n, stats.beta.ppf(1 - tail, k + 1, np.maximum(n - k, 1)), 1.0)
    return low, high


def _value_at(cumulative: np.ndarray, rank: np.ndarray, outside: float) -> np.ndarray:
    index = np.minimum(np.sum(cumulative < rank[..., None], axis=-1), len(VALUES) - 1)
    return np.where((rank >= 1) & (rank <= cumulative[..., -1]), VALUES[index], outside)


def _fixed_quantile(cumulative: np.ndarray, q: float, confidence: float) -> sq.Interval:
    """The naive rule's fixed-sample interval for a quantile: normal-approximation ranks at one confidence."""
    n = cumulative[..., -1]
    half = stats.norm.ppf(1 - (1 - confidence) / 2) * np.sqrt(n * q * (1 - q))
    return _value_at(cumulative, np.ceil(n * q - half), -np.inf), _value_at(
        cumulative, np.floor(n * q + half) + 1, np.inf
    )


LATENCY_GATES = ((0.5, {"increase_pct": 10.0, "min_effect": 1.0}), (0.99, {"increase_pct": 25.0, "min_effect": 1.0}))


def _stage_outcomes(
    rng: np.random.Generator, canaries: int, *, sequential: bool, tail_share: float = 0.05, step: int = STEP
) -> tuple[np.ndarray, np.ndarray]:
    """(failed, passed) per canary and look for one stage of A/A data and 4 gates: latency p50 and p99, errors
    (each arm 2%, independently), and a divergence-tail share (threshold 5%; by default exactly at it)."""
    n = _sizes(step, LOOKS)
    b, c, both = _error_pairs(rng, 0.02 * 0.98, 0.02 * 0.98, 0.02 * 0.02, streams=canaries, step=step, looks=LOOKS)
    tail = _bernoulli(rng, tail_share, streams=canaries, step=step, looks=LOOKS)
    incumbent, candidate = (_histograms(rng, streams=canaries, step=step, looks=LOOKS) for _ in range(2))
    if sequential:
        errors = sq.gate_cs(lambda a: sq.paired_difference_cs(n, b, c, a, T_STAR), PLAN)
        divergence = sq.gate_cs(lambda a: sq.proportion_cs(n, tail, a, T_STAR), PLAN)
        latency = [
            sq.gate_cs(
                lambda a, q=q, kw=kw: sq.quantile_excess_cs(  # type: ignore[misc]
                    _quantile(incumbent, q, a / 2), _quantile(candidate, q, a / 2), **kw
                ),
                PLAN,
            )
            for q, kw in LATENCY_GATES
        ]
    else:  # today's fixed-sample 95% intervals (Bonferroni over two arms), re-tested at every look
        cand, inc = _clopper_pearson(b + both, n, 0.975), _clopper_pearson(c + both, n, 0.975)
        errors = (cand[0] - inc[1], cand[1] - inc[0])
        divergence = _clopper_pearson(tail, n, 1 - ALPHA)
        latency = [
            sq.quantile_excess_cs(_fixed_quantile(incumbent, q, 0.975), _fixed_quantile(candidate, q, 0.975), **kw)
            for q, kw in LATENCY_GATES
        ]
    intervals = [errors, divergence, *latency]
    thresholds = [0.01, 0.05, 0.0, 0.0]
    failed = np.any([low > thr for (low, _), thr in zip(intervals, thresholds, strict=True)], axis=0)
    passed = np.all([high <= thr for (_, high), thr in zip(intervals, thresholds, strict=True)], axis=0) & (n >= 200)
    return failed, passed


def _canary(
    rng: np.random.Generator, canaries: int, *, sequential: bool, tail_share: float = 0.05, step: int = STEP
) -> tuple[float, float, float, float]:
    """(rolled back, advanced, promoted, pairs to pass a stage) over 6 stages of 40 looks each.

    Rolled back: a fail at any look of any stage, every stage watched for all 40 looks whatever happened (the
    worst case: a held stage moved on by hand). Advanced: stage 0 passed before failing, which any advance
    needs since an inconclusive stage holds. Promoted: every stage passed before failing. Pairs to pass: median
    over the stages that passed."""
    rolled_back = np.zeros(canaries, dtype=bool)
    advanced = np.zeros(canaries, dtype=bool)
    promoted = np.ones(canaries, dtype=bool)
    pass_pairs = []
    for stage in range(PLAN.stages):
        failed, passed = _stage_outcomes(rng, canaries, sequential=sequential, tail_share=tail_share, step=step)
        first_fail = np.where(failed.any(axis=1), failed.argmax(axis=1), LOOKS)
        first_pass = np.where(passed.any(axis=1), passed.argmax(axis=1), LOOKS)
        rolled_back |= (first_fail < LOOKS) & (first_fail <= first_pass)
        if stage == 0:
            advanced = first_pass < first_fail
        promoted &= first_pass < first_fail
        pass_pairs.append((first_pass[first_pass < first_fail] + 1) * step)
    pairs = np.concatenate(pass_pairs)
    median = float(np.median(pairs)) if len(pairs) else math.inf
    return float(rolled_back.mean()), float(advanced.mean()), float(promoted.mean()), median


def test_one_gate_at_its_threshold_looked_at_every_interval_keeps_false_fails_under_alpha() -> None:
    """A tail share exactly at its threshold, 40 looks in a stage: the CS fails <= alpha, a fixed interval does not."""
    rng = np.random.default_rng(21)
    n, k = _sizes(STEP, LOOKS), _bernoulli(rng, 0.05, streams=4000, step=STEP, looks=LOOKS)
    seq_low, seq_high = sq.proportion_cs(n, k, ALPHA, T_STAR)
    fix_low, fix_high = _clopper_pearson(k, n, 1 - ALPHA)
    sequential, naive = _ever(seq_low > 0.05), _ever(fix_low > 0.05)
    one_look = float((fix_low[:, -1] > 0.05).mean())
    print(
        f"one gate at its threshold, 40 looks: false fail sequential {sequential:.2%}, fixed-sample {naive:.2%} "
        f"(one look {one_look:.2%}); false pass sequential {_ever(seq_high <= 0.05):.2%}, "
        f"fixed-sample {_ever(fix_high <= 0.05):.2%}"
    )
    assert sequential <= ALPHA < naive


def test_a_whole_aa_canary_looked_at_every_interval_rolls_back_and_advances_at_most_alpha() -> None:
    """6 stages x 4 gates x 40 looks, a divergence-tail share exactly at its threshold, 400 canaries:
    false rollbacks and false advances each <= alpha with the plan's split; the fixed-sample rule is printed."""
    sequential = _canary(np.random.default_rng(22), 400, sequential=True)
    naive = _canary(np.random.default_rng(22), 400, sequential=False)
    print(
        f"A/A canary, tail at its threshold ({PLAN.describe()}): false rollback sequential {sequential[0]:.2%}, "
        f"fixed-sample {naive[0]:.2%}; false advance sequential {sequential[1]:.2%}, fixed-sample {naive[1]:.2%}"
    )
    assert sequential[0] <= ALPHA < naive[0]
    assert sequential[1] <= ALPHA


def test_a_good_candidate_is_not_rolled_back_and_what_promoting_it_costs_is_printed() -> None:
    """Every gate on its good side (tail share 3% against 5%), stages of 40 looks x 250 pairs: rolled back in
    <= alpha; the share promoted and the pairs a stage needs to pass are printed against the fixed-sample rule."""
    sequential = _canary(np.random.default_rng(23), 200, sequential=True, tail_share=0.03, step=250)
    naive = _canary(np.random.default_rng(23), 200, sequential=False, tail_share=0.03, step=250)
    print(
        f"good candidate, 10,000-pair stages: rolled back sequential {sequential[0]:.2%}, fixed-sample {naive[0]:.2%}; "
        f"promoted sequential {sequential[2]:.1%}, fixed-sample {naive[2]:.1%}; median pairs to pass a stage: "
        f"sequential {sequential[3]:.0f}, fixed-sample {naive[3]:.0f}"
    )
    assert sequential[0] <= ALPHA


# (iii) power at the plan's split alpha


def _first_decision(failed: np.ndarray, step: int) -> tuple[float, float]:
    first = np.where(failed.any(axis=1), failed.argmax(axis=1) + 1, np.inf) * step
    return float(failed.any(axis=1).mean()), float(np.median(first))


def test_a_candidate_with_three_more_points_of_errors_fails_within_2000_pairs() -> None:
    """Incumbent errs on 1%, the candidate on those and 3% more (threshold 1 pp): >= 90% fail by 2,000 pairs."""
    rng = np.random.default_rng(31)
    b, c = _discordant(rng, 0.03, 0.0, streams=2000, step=STEP, looks=LOOKS)
    low, _ = sq.paired_difference_cs(_sizes(STEP, LOOKS), b, c, PLAN.fail_alpha, T_STAR)
    power, median = _first_decision(low > 0.01, STEP)
    independent = _discordant(rng, 0.04 * 0.99, 0.01 * 0.96, streams=2000, step=STEP, looks=LOOKS)
    low_ind, _ = sq.paired_difference_cs(_sizes(STEP, LOOKS), *independent, PLAN.fail_alpha, T_STAR)
    power_ind, _ = _first_decision(low_ind > 0.01, STEP)
    print(
        f"+3 pp errors at alpha {PLAN.fail_alpha:.3g}: power {power:.1%} by 2,000 pairs, median {median:.0f} pairs; "
        f"independent 1% vs 4%: {power_ind:.1%}"
    )
    assert power >= 0.9


def test_a_candidate_thirty_percent_slower_at_the_median_fails_within_2000_pairs() -> None:
    """p50 +30% against a 10% allowance, each arm's quantile CS at the plan's per-arm alpha: >= 90% fail."""
    rng = np.random.default_rng(32)
    incumbent = _histograms(rng, streams=500, step=STEP, looks=LOOKS)
    candidate = _histograms(rng, streams=500, step=STEP, looks=LOOKS, scale=1.3)
    low, _ = sq.quantile_excess_cs(
        _quantile(incumbent, 0.5, PLAN.fail_alpha / 2),
        _quantile(candidate, 0.5, PLAN.fail_alpha / 2),
        increase_pct=10.0,
    )
    power, median = _first_decision(low > 0, STEP)
    print(f"p50 +30% at alpha {PLAN.fail_alpha / 2:.3g} per arm: power {power:.1%} by 2,000 pairs, median {median:.0f}")
    assert power >= 0.9


# (iv) small samples


@pytest.mark.parametrize("alpha", [ALPHA, PLAN.fail_alpha])
def test_exact_sequences_hold_at_every_one_of_the_first_30_pairs(alpha: float) -> None:
    """Looking after every pair from the first: proportion, paired and quantile-rank CSs miss in <= alpha."""
    rng = np.random.default_rng(41)
    n = _sizes(1, 30)
    k = _bernoulli(rng, 0.02, streams=20_000, step=1, looks=30)
    low, high = sq.proportion_cs(n, k, alpha, T_STAR)
    b, c = _discordant(rng, 0.01, 0.0, streams=20_000, step=1, looks=30)
    d_low, d_high = sq.paired_difference_cs(n, b, c, alpha, T_STAR)
    below = _bernoulli(rng, 0.99, streams=20_000, step=1, looks=30)  # pairs at or below the true p99
    r_low, r_high = sq.rank_bounds(n, 0.99, alpha, T_STAR)
    rates = {
        "proportion": _ever((low > 0.02) | (high < 0.02)),
        "paired": _ever((d_low > 0.01) | (d_high < 0.01)),
        "p99 rank": _ever((below < np.ceil(r_low)) | (below > np.floor(r_high))),
    }
    print(f"first 30 pairs at alpha {alpha:.3g}: " + ", ".join(f"{k} {v:.3%}" for k, v in rates.items()))
    assert max(rates.values()) <= alpha


def test_the_asymptotic_mean_cs_is_the_whole_line_before_30_values_then_holds_on_moderate_skew() -> None:
    """Below 30 values it decides nothing; latencies (sigma 0.5) looked at after each of the first 300 values
    miss <= alpha even at the split alpha. Heavier skew (sigma 1) is printed, not assumed: see the docs."""
    rng = np.random.default_rng(42)
    n = _sizes(1, 300)
    rates = {}
    for sigma in (SIGMA, 1.0):
        values = rng.lognormal(0.0, sigma, size=(20_000, 300))
        mean = math.exp(sigma**2 / 2)
        for alpha in (ALPHA, PLAN.fail_alpha):
            low, high = sq.mean_cs(n, values.cumsum(axis=1), (values**2).cumsum(axis=1), alpha, T_STAR)
            assert np.isinf(low[:, : sq.MIN_N - 1]).all() and np.isinf(high[:, : sq.MIN_N - 1]).all()
            rates[sigma, alpha] = _ever((low > mean) | (high < mean))
    print(
        "mean CS, first 300 lognormal values: "
        + ", ".join(f"sigma {s} alpha {a:.3g} -> {r:.3%}" for (s, a), r in rates.items())
    )
    assert rates[SIGMA, ALPHA] <= ALPHA and rates[SIGMA, PLAN.fail_alpha] <= PLAN.fail_alpha


def test_one_pair_decides_nothing() -> None:
    """After a single pair every gate's CS straddles its threshold (or is the whole line): inconclusive."""
    intervals = {
        "proportion": sq.proportion_cs(1, 1, PLAN.fail_alpha, T_STAR),
        "paired": sq.paired_difference_cs(1, 1, 0, PLAN.fail_alpha, T_STAR),
        "mean": sq.mean_cs(1, 5.0, 25.0, PLAN.fail_alpha, T_STAR),
        "quantile": sq.quantile_cs([1.0, 2.0], [1, 1], 0.5, PLAN.fail_alpha / 2, T_STAR),
    }
    for name, (low, high) in intervals.items():
        decision = sq.decide(float(low), float(high), 0.01, n=1, min_pairs=1, plan=PLAN, t_star=T_STAR)
        assert decision.outcome == sq.INCONCLUSIVE, name


# the pieces


def test_the_margin_is_the_two_sided_normal_mixture_boundary_of_confseq() -> None:
    """margin(t) * t equals confseq's sqrt((v + rho)(log(1 + v / rho) + 2 log(1 / alpha))) at v = t."""
    t = np.array([1.0, 10.0, 2000.0, 1e6])
    rho = 1.0 / sq.mixing_variance(0.01, 500)
    confseq = np.sqrt((t + rho) * (np.log(1 + t / rho) + 2 * math.log(1 / 0.01))) / t
    np.testing.assert_allclose(sq.margin(t, 0.01, 500), confseq, rtol=1e-12)
    assert np.isinf(sq.margin(0, 0.01, 500))


def test_the_ratio_cs_keeps_exactly_the_ratios_the_linearised_test_keeps() -> None:
    """R0 is inside the Fieller-style CS iff the CS for the mean of y - R0 x holds 0."""
    rng = np.random.default_rng(51)
    x = rng.gamma(2.0, 0.5, 300)
    y = 1.1 * x + rng.normal(0, 0.3, 300)
    sums = (300, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())
    low, high = sq.ratio_cs(*sums, 0.01, T_STAR)
    for r0 in np.linspace(0.8, 1.4, 61):
        z = y - r0 * x
        z_low, z_high = sq.mean_cs(300, z.sum(), (z * z).sum(), 0.01, T_STAR)
        assert (low <= r0 <= high) == (z_low <= 0 <= z_high)


def test_a_quantile_cs_reads_order_statistics_off_the_cumulative_counts() -> None:
    """The bounds are bucket values whose ranks bracket n*q, widened by the sketch's accuracy."""
    values = np.arange(1.0, 1001.0)
    low, high = sq.quantile_cs(values, np.arange(1, 1001), 0.5, 0.05, T_STAR, relative_accuracy=0.01)
    rank_low, rank_high = sq.rank_bounds(1000, 0.5, 0.05, T_STAR)
    assert low == pytest.approx(math.ceil(rank_low) / 1.01)
    assert high == pytest.approx((math.floor(rank_high) + 1) / 0.99)
    assert low < 500 < high


def test_the_plan_splits_alpha_over_every_gate_of_every_stage() -> None:
    """4 gates x 6 stages at alpha 5%: failing bounds at 5%/24 (every gate of every stage), passing ones at 5%/4."""
    assert PLAN.fail_alpha == pytest.approx(0.05 / 24)
    assert PLAN.pass_alpha == pytest.approx(0.05 / 4)
    with pytest.raises(ValueError):
        sq.split_alpha(0.05, 0, 6)


def test_decisions_mirror_the_fixed_sample_rule_with_the_sequences_own_need_estimate() -> None:
    """Fail on the bad side at any n, pass on the good side from min_pairs, else the pairs the CS needs."""
    kw = {"plan": sq.split_alpha(0.01, 1, 1), "t_star": T_STAR}
    assert sq.decide(0.02, 0.05, 0.01, n=10, min_pairs=100, **kw).outcome == sq.FAIL
    assert sq.decide(-0.01, 0.0, 0.01, n=500, min_pairs=100, **kw).outcome == sq.PASS
    early = sq.decide(-0.01, 0.0, 0.01, n=50, min_pairs=100, **kw)
    assert (early.outcome, early.need_more_pairs) == (sq.INCONCLUSIVE, 50)
    assert sq.decide(-0.2, -0.1, -0.05, n=500, min_pairs=100, higher_is_worse=False, **kw).outcome == sq.FAIL
    waiting = sq.decide(0.0, 0.03, 0.02, n=1000, min_pairs=100, estimate=0.015, **kw)
    assert waiting.outcome == sq.INCONCLUSIVE and waiting.need_more_pairs is not None
    later = 1000 + waiting.need_more_pairs
    assert (
        sq.margin(later, 0.01, T_STAR)
        <= sq.margin(1000, 0.01, T_STAR) * 0.005 / 0.015
        < sq.margin(later - 1, 0.01, T_STAR)
    )


def test_a_gate_takes_its_failing_bound_at_the_fail_level_and_its_passing_bound_at_the_pass_level() -> None:
    """Higher is worse: low from the fail level, high from the pass level; lower is worse: the other way round."""

    def cs(alpha: float) -> sq.Interval:
        return sq.proportion_cs(2000, 100, alpha, T_STAR)

    fail_low, fail_high = cs(PLAN.fail_alpha)
    pass_low, pass_high = cs(PLAN.pass_alpha)
    assert sq.gate_cs(cs, PLAN) == (fail_low, pass_high)
    assert sq.gate_cs(cs, PLAN, higher_is_worse=False) == (pass_low, fail_high)
    assert fail_low < pass_low < pass_high < fail_high

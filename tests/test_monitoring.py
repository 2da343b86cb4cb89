"""The controller's gates under continuous monitoring, simulated look by look through the real gate code."""

from __future__ import annotations

import numpy as np

from proxy.comparator import monitoring
from proxy.comparator import sequential as sq
from proxy.comparator.similarity import IDENTICAL
from proxy.config import GatesConfig

CFG = GatesConfig()
# The default canary: 6 stages of 4 gates, alpha 5% over the whole canary.
PLAN = sq.split_alpha(0.05, 4, 6)
LOOKS = range(200, 4_001, 200)  # a stage of 4,000 pairs looked at 20 times
RUNS = 200


def _error_counters(inc: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    return {
        "n": float(len(inc)),
        "out:inc:http_5xx": float(inc.sum()),
        "out:cand:http_5xx": float(cand.sum()),
        "err:cand_only": float((cand & ~inc).sum()),
        "err:inc_only": float((inc & ~cand).sum()),
    }


def test_an_aa_error_gate_looked_at_forty_times_almost_never_fails() -> None:
    """Equal 2% error rates, 20 looks per stage: the gate fails in at most its share of the 5% budget."""
    rng = np.random.default_rng(21)
    fails = 0
    for _ in range(RUNS):
        inc, cand = rng.random(LOOKS[-1]) < 0.02, rng.random(LOOKS[-1]) < 0.02
        outcomes = {monitoring.error_gate(_error_counters(inc[:n], cand[:n]), CFG, PLAN, 2000).outcome for n in LOOKS}
        fails += "fail" in outcomes
    assert fails / RUNS <= PLAN.fail_alpha + 0.01  # about 0.2% allowed per gate and stage; none seen is typical


def test_a_candidate_with_three_more_points_of_errors_is_caught_within_the_stage() -> None:
    """2% against 5% errors (independent): the sequence fails the candidate within 4,000 pairs in most stages.

    Measured: 83 of 100 at 40 looks (docs/sequential.md): always-valid bounds at the canary's split alpha
    cost power against a single look, which is the price of looking continuously."""
    rng = np.random.default_rng(22)
    caught = 0
    for _ in range(100):
        inc, cand = rng.random(LOOKS[-1]) < 0.02, rng.random(LOOKS[-1]) < 0.05
        outcomes = [monitoring.error_gate(_error_counters(inc[:n], cand[:n]), CFG, PLAN, 2000).outcome for n in LOOKS]
        caught += "fail" in outcomes
    assert caught >= 75


def test_divergence_at_its_threshold_looked_at_often_rarely_fails() -> None:
    """A candidate exactly at the allowed excess below the frozen A/A threshold: false fails stay in budget."""
    rng = np.random.default_rng(23)
    t_bucket = 150  # the frozen threshold: the A/A 5% quantile sits at similarity 0.75
    reference = {t_bucket - 10: 5.0, t_bucket: 45.0, IDENTICAL: 50.0}
    fails = 0
    for _ in range(RUNS):
        aa_below = rng.random(LOOKS[-1] // 5) < 0.05
        cand_below = rng.random(LOOKS[-1]) < 0.10  # 5 points more: exactly the default allowance
        outcomes = set()
        for n in LOOKS:
            k_a, n_a = int(aa_below[: n // 5].sum()), n // 5
            k_c = int(cand_below[:n].sum())
            counters = {
                f"sim:cand:{t_bucket - 20}": float(k_c),
                f"sim:cand:{IDENTICAL}": float(n - k_c),
                f"sim:aa:{t_bucket - 20}": float(k_a),
                f"sim:aa:{IDENTICAL}": float(n_a - k_a),
            }
            outcomes.add(monitoring.divergence_gate(counters, CFG, PLAN, 2000, reference).outcome)
        fails += "fail" in outcomes
    assert fails / RUNS <= 0.02

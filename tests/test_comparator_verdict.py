"""Verdict rules on known counts and samples, Benjamini-Hochberg across segments, drift flags."""

from __future__ import annotations

import numpy as np

from proxy.comparator.aggregate import _add_sketch
from proxy.comparator.intervals import quantile_bounds
from proxy.comparator.report import _drift
from proxy.comparator.verdict import Gate, correct_segments, divergence_gate, error_gate, latency_gate, overall
from proxy.config import GatesConfig
from proxy.redis import WindowData

CFG = GatesConfig()


def _errors(n: int, inc: int, cand: int) -> dict[str, float]:
    return {"n": n, "out:inc:http_5xx": inc, "out:cand:http_5xx": cand}


def test_zero_errors_pass_only_once_n_bounds_the_difference() -> None:
    """0 vs 0 is inconclusive at n=200 (bound above 1 pp) and passes at n=500."""
    small = error_gate(_errors(200, 0, 0), CFG)
    assert small.outcome == "inconclusive" and small.need_more_pairs and small.need_more_pairs > 0
    assert error_gate(_errors(500, 0, 0), CFG).outcome == "pass"


def test_candidate_errors_on_a_zero_baseline_never_pass() -> None:
    """Any candidate error rate clearly above the threshold fails; a small one is never a pass."""
    assert error_gate(_errors(400, 0, 20), CFG).outcome == "fail"
    assert error_gate(_errors(400, 0, 3), CFG).outcome != "pass"
    assert error_gate(_errors(50, 0, 50), CFG).outcome == "inconclusive"  # below min_pairs, whatever the rate


def test_divergence_is_measured_against_the_noise_floor() -> None:
    """The same similarity distribution passes against an equal A/A one and fails against identical A/A."""
    from proxy.comparator.similarity import IDENTICAL, bucket

    sampled = {bucket(0.7): 300.0, bucket(0.9): 400.0, IDENTICAL: 300.0}  # paraphrases, like a sampling LLM
    counters = {f"sim:cand:{b}": n for b, n in sampled.items()}
    with_floor = divergence_gate(counters | {f"sim:aa:{b}": n for b, n in sampled.items()}, CFG)
    assert with_floor.outcome == "pass", with_floor.rule
    deterministic = divergence_gate(counters | {f"sim:aa:{IDENTICAL}": 1000.0}, CFG)
    assert deterministic.outcome == "fail" and deterministic.details["p_a"] == 0.0
    without = divergence_gate(counters, CFG)
    assert without.outcome == "inconclusive" and "A/A" in without.rule


def _sketched(inc: np.ndarray, cand: np.ndarray, *, cand_censored: np.ndarray | None = None) -> dict[str, float]:
    """The counters a comparator would have written for these latencies (ms); censored values are timeouts."""
    counters: dict[str, float] = {"n": float(len(inc))}
    censored = np.zeros(len(cand), dtype=bool) if cand_censored is None else cand_censored
    for value in inc:
        _add_sketch(counters, "lat", "inc", float(value))
    for value, cut in zip(cand, censored, strict=True):
        _add_sketch(counters, "latc" if cut else "lat", "cand", float(value))
    return counters


def test_latency_gate_uses_every_pair() -> None:
    """A 30% slower candidate fails p50; an equal one passes; the interval contains the true shift."""
    rng = np.random.default_rng(1)
    inc = rng.normal(100, 5, 400)
    slow = latency_gate(_sketched(inc, inc * 1.3), [], CFG, 50)
    assert slow.outcome == "fail" and slow.interval and slow.interval[0] < 30 < slow.interval[1]
    assert latency_gate(_sketched(inc, inc + rng.normal(0, 1, 400)), [], CFG, 50).outcome == "pass"


def test_intervals_keep_shrinking_past_two_thousand_pairs() -> None:
    """n is every pair, and the interval at 50,000 pairs is narrower than at 2,000."""
    rng = np.random.default_rng(2)
    widths = {}
    for n in (2_000, 50_000):
        inc = rng.lognormal(5, 0.5, n)
        gate = latency_gate(_sketched(inc, rng.lognormal(5, 0.5, n)), [], CFG, 99)
        assert gate.n == n and gate.interval is not None
        widths[n] = gate.interval[1] - gate.interval[0]
    assert widths[50_000] < widths[2_000] / 2


def test_a_candidate_timing_out_on_its_slowest_one_percent_fails_p99() -> None:
    """Timeouts are counted at the timeout, not dropped: a hidden tail moves p99 and the gate fails."""
    rng = np.random.default_rng(3)
    n, timeout = 5_000, 10_000.0
    inc = rng.lognormal(7.5, 0.6, n)  # p99 about 7 s
    cand = rng.lognormal(7.6, 0.75, n)
    slowest = cand >= np.quantile(cand, 0.99)
    cand = np.where(slowest, timeout, cand)  # those never answered: censored at the 10 s timeout
    counters = _sketched(inc, cand, cand_censored=slowest)
    gate = latency_gate(counters, [], CFG, 99)
    assert gate.outcome == "fail", gate.rule
    assert gate.details["censored_answers"]["candidate"] == 50
    hidden = latency_gate(_sketched(inc[~slowest], cand[~slowest]), [], CFG, 99)
    assert hidden.outcome != "fail"  # what dropping the failed pairs used to show


def test_order_statistic_intervals_cover_the_true_quantile() -> None:
    """Over 300 seeded samples the 95% interval of a p99 covers the true value at least 93% of the time."""
    rng = np.random.default_rng(4)
    true_p99 = float(np.exp(5 + 0.5 * 2.3263478740408408))
    covered = 0
    for _ in range(300):
        values = rng.lognormal(5, 0.5, 3_000)
        counters: dict[str, float] = {}
        for value in values:
            _add_sketch(counters, "lat", "cand", float(value))
        bounds = quantile_bounds(counters, "lat", "cand", 0.99, 0.95)
        covered += bounds.low * 0.99 <= true_p99 <= bounds.high * 1.01  # the sketch's 1% relative accuracy
    assert covered / 300 >= 0.93


def test_overall_outcome() -> None:
    """Fail beats everything; pass needs every applicable gate to pass; skipped gates do not count."""

    def gate(outcome: str) -> Gate:
        return Gate("g", outcome, "", None, None, 0, None, "", "")

    assert overall([gate("pass"), gate("fail")]) == "fail"
    assert overall([gate("pass"), gate("skipped")]) == "pass"
    assert overall([gate("pass"), gate("inconclusive")]) == "inconclusive"
    assert overall([gate("skipped")]) == "inconclusive"


def test_benjamini_hochberg_downgrades_weak_segment_fails() -> None:
    """Among many segments a marginal fail is not a discovery; a strong one stays."""
    strong = Gate("error_rate", "fail", "", 0.1, None, 100, 0.01, "", "strong", p_value=1e-6)
    weak = Gate("error_rate", "fail", "", 0.02, None, 100, 0.01, "", "weak", p_value=0.04)
    others = [[Gate("error_rate", "pass", "", 0.0, None, 100, 0.01, "", "", p_value=0.9)] for _ in range(10)]
    correct_segments([[strong], [weak], *others], fdr=0.05)
    assert strong.outcome == "fail"
    assert weak.outcome == "inconclusive" and "Benjamini-Hochberg" in weak.rule


def test_drift_flags_a_rate_that_moves_across_the_range() -> None:
    """A candidate error rate rising from 0% to 20% over six windows is flagged; a steady one is not."""
    windows = [
        WindowData(60 * i, "s", {"n": 200, "out:cand:http_5xx": 0 if i < 3 else 40, "out:inc:ok": 200}, [], [])
        for i in range(6)
    ]
    flags = {d["metric"]: d["drift"] for d in _drift(windows, 20.0)}
    assert flags["error_rate.candidate"] is True
    assert flags["error_rate.incumbent"] is False


def test_a_single_priced_pair_leaves_the_cost_gate_inconclusive() -> None:
    """One pair has no interval: the gate says it needs more instead of failing the report."""
    from proxy.comparator.verdict import cost_gate

    one = {"costp_n": 1, "costp_x": 0.002, "costp_y": 0.001, "costp_xx": 4e-6, "costp_yy": 1e-6, "costp_xy": 2e-6}
    gate = cost_gate(one, GatesConfig())
    assert gate.outcome == "inconclusive" and gate.need_more_pairs == GatesConfig().min_pairs - 1


def _cost_counters(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        "costp_n": float(len(x)),
        "costp_x": float(x.sum()),
        "costp_y": float(y.sum()),
        "costp_xx": float((x * x).sum()),
        "costp_yy": float((y * y).sum()),
        "costp_xy": float((x * y).sum()),
    }


def test_the_cost_ratio_interval_covers_the_truth_and_decides() -> None:
    """A candidate 30% dearer fails at 1.1x; one 20% cheaper passes; the interval covers the true ratio."""
    from proxy.comparator.verdict import cost_gate

    rng = np.random.default_rng(5)
    tokens = rng.lognormal(6, 0.8, 3_000)
    incumbent = tokens * 1e-5
    dear = cost_gate(_cost_counters(incumbent, tokens * rng.uniform(1.2, 1.4, 3_000) * 1e-5), GatesConfig())
    assert dear.outcome == "fail" and dear.interval and dear.interval[0] < 1.3 < dear.interval[1]
    cheap = cost_gate(_cost_counters(incumbent, tokens * 0.8e-5), GatesConfig())
    assert cheap.outcome == "pass"

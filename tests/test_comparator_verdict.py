"""Verdict rules on known counts and samples, Benjamini-Hochberg across segments, drift flags."""

from __future__ import annotations

import numpy as np

from proxy.comparator.report import _drift
from proxy.comparator.store import WindowData
from proxy.comparator.verdict import Gate, correct_segments, divergence_gate, error_gate, latency_gate, overall
from proxy.config import GatesConfig

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
    """The same divergence passes against an equal A/A floor and fails against none."""
    counters = {"div_n": 1000, "div": 300, "aa:div_n": 1000, "aa:div": 300}
    with_floor = divergence_gate(counters, CFG)
    assert with_floor.estimate == 0.0 and with_floor.outcome != "fail"
    without = divergence_gate({"div_n": 1000, "div": 300}, CFG)
    assert without.outcome == "fail" and "not measured" in without.details["noise_floor"]


def _pairs(inc: np.ndarray, cand: np.ndarray) -> list[list[float]]:
    return [[a, b, -1, -1, 0, 0, 0, 0, 0] for a, b in zip(inc, cand, strict=True)]


def test_latency_gate_on_paired_samples() -> None:
    """A 30% slower candidate fails p50; an equal one passes; the interval contains the true shift."""
    rng = np.random.default_rng(1)
    inc = rng.normal(100, 5, 400)
    slow = latency_gate({}, _pairs(inc, inc * 1.3), CFG, 50)
    assert slow.outcome == "fail" and slow.interval and slow.interval[0] < 30 < slow.interval[1]
    assert latency_gate({}, _pairs(inc, inc + rng.normal(0, 1, 400)), CFG, 50).outcome == "pass"


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
    """One pair cannot be bootstrapped: the gate says it needs more instead of failing the report."""
    from proxy.comparator.verdict import cost_gate
    from proxy.config import GatesConfig

    gate = cost_gate({}, [[10.0, 12.0, -1, -1, 0.002, 0.001, 0, 0, 0]], GatesConfig())
    assert gate.outcome == "inconclusive" and gate.need_more_pairs == GatesConfig().min_pairs - 1

"""Verdicts from aggregates: a test suited to each gate, thresholds in real units, explained outcomes.

- Latency p50/p99: order-statistic intervals of each arm's quantile over every pair, from the merged
  sketches, failures counted at the arm's timeout (censored), combined with Bonferroni.
- Error rate: exact Clopper-Pearson intervals for each arm, combined conservatively (Bonferroni), and
  McNemar's exact test on discordant pairs. A candidate with errors against an incumbent with none fails
  once n suffices; it never passes on a zero baseline because the candidate's upper bound must clear it.
- Divergence: candidate-vs-incumbent similarity scores against the incumbent's own A/A scores, by the
  share of pairs below the A/A's low quantiles and a Hodges-Lehmann shift (``divergence.py``).
- Judge: the candidate's win rate among non-tie judged pairs minus 50%, exact Clopper-Pearson interval,
  against a margin (``judge.py``); present only where a judge looked.
- Cost: delta-method interval of the ratio of mean cost per request over every pair priced on both arms.
Outcomes: pass (the whole interval is on the good side of the threshold), fail (the whole interval is
on the bad side), inconclusive (it straddles, or n is below the gate's minimum) with an estimate of
how many more pairs would decide it. Segment verdicts are corrected with Benjamini-Hochberg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from ..config import GatesConfig
from . import divergence
from .aggregate import PAIR_FIELDS, quantiles, similarity_histogram
from .intervals import cost_ratio_bounds, quantile_bounds

PASS, FAIL, INCONCLUSIVE, SKIPPED = "pass", "fail", "inconclusive", "skipped"
FIXED_SAMPLE = "fixed-sample interval (valid for a single look)"
_COL = {name: i for i, name in enumerate(PAIR_FIELDS)}
_MAX_BOOTSTRAP_PAIRS = 2000


@dataclass(slots=True)
class Gate:
    """One gate's outcome and the evidence for it."""

    name: str
    outcome: str
    statistic: str
    estimate: float | None
    interval: tuple[float, float] | None
    n: int
    threshold: float | None
    unit: str
    rule: str
    p_value: float | None = None
    need_more_pairs: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    method: str = FIXED_SAMPLE

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["interval"] = list(self.interval) if self.interval else None
        return data


def _clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def _need_more(n: int, interval: tuple[float, float], estimate: float, threshold: float) -> int | None:
    """Pairs still needed for the interval to clear the threshold, assuming it narrows as 1/sqrt(n)."""
    half = (interval[1] - interval[0]) / 2.0
    margin = abs(estimate - threshold)
    if margin <= 1e-12 or half <= 0 or not math.isfinite(half):
        return None
    needed = n * (half / margin) ** 2
    return max(1, math.ceil(needed - n))


def _decide(
    gate: Gate, interval: tuple[float, float], threshold: float, min_pairs: int, *, higher_is_worse: bool = True
) -> Gate:
    gate.interval = (round(interval[0], 6), round(interval[1], 6))
    gate.threshold = threshold
    low, high = interval
    if gate.n < min_pairs:
        gate.outcome = INCONCLUSIVE
        gate.need_more_pairs = min_pairs - gate.n
        gate.rule = f"n={gate.n} below the gate minimum of {min_pairs} pairs"
    elif low > threshold:
        gate.outcome = FAIL
        gate.rule = f"whole interval above the threshold ({low:.4g} > {threshold:.4g})"
    elif high <= threshold:
        gate.outcome = PASS
        gate.rule = f"whole interval at or below the threshold ({high:.4g} <= {threshold:.4g})"
    else:
        gate.outcome = INCONCLUSIVE
        gate.rule = f"interval [{low:.4g}, {high:.4g}] straddles the threshold {threshold:.4g}"
        if gate.estimate is not None:
            gate.need_more_pairs = _need_more(gate.n, interval, gate.estimate, threshold)
    return gate


def _paired(pairs: Sequence[Sequence[float]], a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.empty(0), np.empty(0)
    data = np.asarray(pairs, dtype=float)
    keep = (
        (data[:, _COL[a]] >= 0)
        & (data[:, _COL[b]] >= 0)
        & (data[:, _COL["err_inc"]] == 0)
        & (data[:, _COL["err_cand"]] == 0)
    )
    data = data[keep]
    if len(data) > _MAX_BOOTSTRAP_PAIRS:
        data = data[np.random.default_rng(0).choice(len(data), _MAX_BOOTSTRAP_PAIRS, replace=False)]
    return data[:, _COL[a]], data[:, _COL[b]]


def _bootstrap(
    x: np.ndarray, y: np.ndarray, statistic: Any, confidence: float
) -> tuple[tuple[float, float], np.ndarray]:
    result = stats.bootstrap(
        (x, y),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=1000,
        batch=250,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(0),
    )
    ci = result.confidence_interval
    return (float(ci.low), float(ci.high)), np.asarray(result.bootstrap_distribution)


def latency_gate(counters: dict[str, float], pairs: Sequence[Sequence[float]], cfg: GatesConfig, q: int) -> Gate:
    """Order-statistic intervals of each arm's q-th percentile of total latency over every pair (failures
    counted at the arm's timeout), combined with Bonferroni into an interval of the difference."""
    pct = cfg.latency_p50_increase_pct if q == 50 else cfg.latency_p99_increase_pct
    joint = 1.0 - (1.0 - cfg.confidence) / 2.0  # both arms' intervals hold together at `confidence`
    inc = quantile_bounds(counters, "lat", "inc", q / 100.0, joint)
    cand = quantile_bounds(counters, "lat", "cand", q / 100.0, joint)
    n = min(inc.n, cand.n)
    gate = Gate(
        f"latency_p{q}",
        INCONCLUSIVE,
        f"p{q}(candidate) - p{q}(incumbent), order-statistic intervals over all pairs, failures censored",
        None,
        None,
        n,
        None,
        "ms",
        "",
    )
    if inc.estimate is None or cand.estimate is None:
        return _decide(gate, (-math.inf, math.inf), cfg.latency_min_effect_ms, max(cfg.min_pairs, 2))
    threshold = max(cfg.latency_min_effect_ms, inc.estimate * pct / 100.0)
    gate.estimate = round(cand.estimate - inc.estimate, 3)
    interval = (cand.low - inc.high, cand.high - inc.low)
    half = (interval[1] - interval[0]) / 2.0
    if math.isfinite(half) and half > 0:
        se = half / float(stats.norm.ppf(joint))
        gate.p_value = float(stats.norm.sf((gate.estimate - threshold) / se))
    gate.details = {
        f"incumbent_p{q}_ms": round(inc.estimate, 3),
        f"candidate_p{q}_ms": round(cand.estimate, 3),
        "incumbent_censored": inc.censored,
        "candidate_censored": cand.censored,
        "censored_answers": {"incumbent": _censored(counters, "inc"), "candidate": _censored(counters, "cand")},
        "threshold_rule": f"max({cfg.latency_min_effect_ms} ms, {pct}% of incumbent p{q})",
    }
    incumbent, candidate = _paired(pairs, "lat_inc", "lat_cand")
    if len(incumbent) > 1:  # descriptive only: the decision uses every pair through the sketches
        deltas = candidate - incumbent
        gate.details["median_paired_delta_ms"] = round(float(np.median(deltas)), 3)
        gate.details["wilcoxon_p"] = float(stats.wilcoxon(deltas).pvalue) if np.any(deltas != 0) else 1.0
    _decide(gate, interval, round(threshold, 3), cfg.min_pairs)
    if cand.censored:
        gate.rule += f"; the candidate's p{q} is among answers that never came: at least {cand.estimate:.0f} ms"
    tail = (1.0 - joint) / 2.0
    bounded_after = math.ceil(math.log(tail) / math.log(q / 100.0))  # all n below x_q has probability q^n
    if gate.outcome == INCONCLUSIVE and not all(map(math.isfinite, interval)) and n < bounded_after:
        gate.need_more_pairs = max(1, bounded_after - n)
        gate.rule += f"; a p{q} has an upper bound only from {bounded_after} pairs"
    return gate


def _censored(counters: dict[str, float], arm: str) -> int:
    return int(sum(v for k, v in counters.items() if k.startswith(f"sk:latc:{arm}:")))


def _errors(counters: dict[str, float], arm: str) -> int:
    return int(sum(v for k, v in counters.items() if k.startswith(f"out:{arm}:") and not k.endswith(":ok")))


def error_gate(counters: dict[str, float], cfg: GatesConfig) -> Gate:
    """Exact intervals of each arm's error rate; the difference's bounds must clear the threshold."""
    n = int(counters.get("n", 0))
    e_inc, e_cand = _errors(counters, "inc"), _errors(counters, "cand")
    joint = 1.0 - (1.0 - cfg.confidence) / 2.0  # Bonferroni: both intervals hold together at `confidence`
    inc_low, inc_high = _clopper_pearson(e_inc, n, joint)
    cand_low, cand_high = _clopper_pearson(e_cand, n, joint)
    threshold = cfg.error_rate_increase_pp / 100.0
    gate = Gate(
        "error_rate",
        INCONCLUSIVE,
        "error rate(candidate) - error rate(incumbent), exact intervals",
        (e_cand - e_inc) / n if n else None,
        None,
        n,
        None,
        "fraction",
        "",
    )
    b, c = int(counters.get("err:cand_only", 0)), int(counters.get("err:inc_only", 0))
    gate.details = {
        "incumbent_errors": e_inc,
        "candidate_errors": e_cand,
        "candidate_only": b,
        "incumbent_only": c,
        "mcnemar_exact_p": float(stats.binomtest(b, b + c).pvalue) if b + c else 1.0,
        "threshold_pp": cfg.error_rate_increase_pp,
    }
    if n:
        gate.p_value = float(stats.binomtest(e_cand, n, min(1.0, e_inc / n + threshold), alternative="greater").pvalue)
    return _decide(gate, (cand_low - inc_high, cand_high - inc_low), threshold, cfg.min_pairs)


def divergence_gate(counters: dict[str, float], cfg: GatesConfig) -> Gate:
    """Candidate-vs-incumbent similarity against the incumbent's own A/A similarity (docs/divergence.md):
    the share of pairs less similar than the A/A's low quantiles, and the shift of the whole distribution."""
    rule = divergence.DivergenceRule(
        excess_pp=cfg.divergence_excess_pp,
        shift_max=cfg.similarity_shift_max,
        quantiles=cfg.noise_quantiles,
        confidence=cfg.confidence,
        min_pairs=cfg.min_pairs,
        min_noise_pairs=cfg.min_noise_pairs,
    )
    r = divergence.evaluate(similarity_histogram(counters, "cand"), similarity_histogram(counters, "aa"), rule)
    details = dict(r.details) | {
        "noise_pairs": r.n_aa,
        "threshold_pp": cfg.divergence_excess_pp,
        "exact_match_rate": _rate_or_none(counters.get("div_n", 0) - counters.get("div", 0), counters.get("div_n", 0)),
    }
    return Gate(
        "divergence",
        r.outcome,
        r.statistic,
        r.estimate,
        r.interval,
        r.n,
        r.threshold,
        "fraction",
        r.rule,
        p_value=r.p_value,
        need_more_pairs=r.need_more_pairs,
        details=details,
    )


def _rate_or_none(k: float, n: float) -> float | None:
    return round(k / n, 6) if n else None


def cost_gate(counters: dict[str, float], cfg: GatesConfig) -> Gate:
    """Ratio of mean cost per request (candidate / incumbent) over every pair priced on both arms."""
    ratio = cost_ratio_bounds(counters, cfg.confidence)
    gate = Gate(
        "cost",
        SKIPPED,
        "mean cost(candidate) / mean cost(incumbent), delta-method interval over all priced pairs",
        None if ratio.estimate is None else round(ratio.estimate, 4),
        None,
        ratio.n,
        cfg.cost_ratio_max,
        "ratio",
        "",
    )
    if not ratio.n or counters.get("costp_x", 0.0) == 0.0:
        gate.rule = (
            "no priced pairs: neither a price table nor the maintained price list knows both arms' models; "
            "set [incumbent.price] and the candidate's price to gate on cost"
        )
        return gate
    if ratio.estimate is None:  # one pair: no interval yet
        return _decide(gate, (-math.inf, math.inf), cfg.cost_ratio_max, max(cfg.min_pairs, 2))
    half = (ratio.high - ratio.low) / 2.0
    if half > 0:
        gate.p_value = float(
            stats.norm.sf((ratio.estimate - cfg.cost_ratio_max) / (half / stats.norm.ppf(0.5 + cfg.confidence / 2)))
        )
    return _decide(gate, (ratio.low, ratio.high), cfg.cost_ratio_max, cfg.min_pairs)


def has_judge_data(counters: Mapping[str, float]) -> bool:
    """Whether a judge looked at this slice at all (verdicts or pairs it skipped)."""
    return any(k.startswith(("judge:", "judge_skipped:")) and v for k, v in counters.items())


def judge_counts(counters: Mapping[str, float]) -> tuple[int, int, int]:
    """(candidate wins, losses, ties) among the pairs the judge decided."""
    return tuple(int(counters.get(f"judge:cand:{o}", 0)) for o in ("win", "loss", "tie"))  # type: ignore[return-value]


def judge_skipped_rule(counters: Mapping[str, float]) -> str:
    skipped = {k.partition(":")[2]: int(v) for k, v in sorted(counters.items()) if k.startswith("judge_skipped:")}
    shown = ", ".join(f"{reason} {n}" for reason, n in skipped.items()) or "none"
    return f"no pair judged (sampled pairs skipped: {shown})"


def judge_gate(counters: dict[str, float], cfg: GatesConfig) -> Gate:
    """Candidate win rate among non-tie judged pairs minus 50%, exact (Clopper-Pearson) interval: fails when
    the whole interval is below -judge_margin_pp, passes when the whole interval is at or above it."""
    wins, losses, ties = judge_counts(counters)
    n = wins + losses
    margin = cfg.judge_margin_pp / 100.0
    gate = Gate(
        "judge",
        SKIPPED,
        "win rate(candidate) - 50% among non-tie judged pairs, exact interval",
        round(wins / n - 0.5, 6) if n else None,
        None,
        n,
        -margin,
        "fraction",
        judge_skipped_rule(counters),
    )
    gate.details = {"wins": wins, "losses": losses, "ties": ties, "threshold_pp": cfg.judge_margin_pp}
    if not n and not ties:
        return gate
    low, high = _clopper_pearson(wins, n, cfg.confidence)
    gate.outcome = INCONCLUSIVE
    gate.interval = (round(low - 0.5, 6), round(high - 0.5, 6))
    if n:  # one-sided: is the win rate below 50% - margin?
        gate.p_value = float(stats.binomtest(wins, n, 0.5 - margin, alternative="less").pvalue)
    if n < cfg.judge_min_pairs:
        gate.rule = f"n={n} non-tie judged pairs, below the gate minimum of {cfg.judge_min_pairs}"
        gate.need_more_pairs = cfg.judge_min_pairs - n
    elif gate.interval[1] < -margin:
        gate.outcome, gate.rule = FAIL, f"whole interval below -{margin:.4g} (the judge prefers the incumbent)"
    elif gate.interval[0] >= -margin:
        gate.outcome, gate.rule = PASS, f"whole interval at or above -{margin:.4g}"
    else:
        gate.rule = f"interval [{gate.interval[0]:.4g}, {gate.interval[1]:.4g}] straddles -{margin:.4g}"
        if gate.estimate is not None:
            gate.need_more_pairs = _need_more(n, gate.interval, gate.estimate, -margin)
    return gate


def evaluate(counters: dict[str, float], pairs: Sequence[Sequence[float]], cfg: GatesConfig) -> list[Gate]:
    """Every gate for one slice of traffic (the judge's only where a judge looked at it)."""
    gates = [
        latency_gate(counters, pairs, cfg, 50),
        latency_gate(counters, pairs, cfg, 99),
        error_gate(counters, cfg),
        divergence_gate(counters, cfg),
        cost_gate(counters, cfg),
    ]
    if has_judge_data(counters):
        gates.append(judge_gate(counters, cfg))
    return gates


def overall(gates: Sequence[Gate]) -> str:
    """fail if any gate fails, pass if every applicable gate passes, else inconclusive."""
    return overall_outcome([g.outcome for g in gates])


def overall_outcome(outcomes: Sequence[str]) -> str:
    """The same rule on bare outcomes."""
    outcomes = [o for o in outcomes if o != SKIPPED]
    if FAIL in outcomes:
        return FAIL
    if outcomes and all(o == PASS for o in outcomes):
        return PASS
    return INCONCLUSIVE


def correct_segments(segment_gates: Sequence[list[Gate]], fdr: float) -> None:
    """Benjamini-Hochberg across every segment's gates: a segment fails only on a discovery."""
    flat = [g for gates in segment_gates for g in gates if g.outcome == FAIL and g.p_value is not None]
    if not flat:
        return
    all_p = [g.p_value for gates in segment_gates for g in gates if g.p_value is not None]
    adjusted = stats.false_discovery_control(np.asarray(all_p, dtype=float), method="bh")
    by_gate = {}
    index = 0
    for gates in segment_gates:
        for gate in gates:
            if gate.p_value is not None:
                by_gate[id(gate)] = float(adjusted[index])
                index += 1
    for gate in flat:
        q_value = by_gate[id(gate)]
        gate.details["bh_adjusted_p"] = q_value
        if q_value > fdr:
            gate.outcome = INCONCLUSIVE
            gate.rule += f"; not significant after Benjamini-Hochberg (q={q_value:.3g} > {fdr})"


def latency_summary(counters: dict[str, float]) -> dict[str, Any]:
    return {
        metric: {"incumbent": quantiles(counters, metric, "inc"), "candidate": quantiles(counters, metric, "cand")}
        for metric in ("lat", "ttfb", "ttft")
    }


def satisfaction_gate(feedback: dict[str, float], cfg: GatesConfig, *, min_feedback: int, drop_max: float) -> Gate:
    """User scores: mean(candidate) - mean(incumbent) with a Welch interval; fails on a clear drop.

    Shadow answers never reach users, so this compares arms only while the candidate serves traffic.
    """
    n = {arm: int(feedback.get(f"scored:{arm}", 0)) for arm in ("incumbent", "candidate")}
    gate = Gate(
        "satisfaction",
        INCONCLUSIVE,
        "mean score(candidate) - mean score(incumbent), Welch interval",
        None,
        None,
        min(n.values()),
        -drop_max,
        "score",
        "",
    )
    means, variances = {}, {}
    for arm, count in n.items():
        if count:
            means[arm] = feedback.get(f"sum:{arm}", 0.0) / count
            var = (feedback.get(f"sumsq:{arm}", 0.0) - count * means[arm] ** 2) / max(count - 1, 1)
            variances[arm] = max(var, 0.0)
    gate.details = {"scored": n, "means": means}
    if not any(n.values()):
        gate.outcome = SKIPPED
        gate.rule = "no scored feedback in range (it compares arms only while the candidate serves users)"
        return gate
    if min(n.values()) < min_feedback:
        gate.rule = f"fewer than {min_feedback} scored answers per arm"
        gate.need_more_pairs = min_feedback - min(n.values())
        return gate
    diff = means["candidate"] - means["incumbent"]
    se_terms = {arm: variances[arm] / n[arm] for arm in n}
    se = math.sqrt(sum(se_terms.values())) or 1e-12
    dof = sum(se_terms.values()) ** 2 / sum(t**2 / max(n[a] - 1, 1) for a, t in se_terms.items()) if se > 1e-12 else 1e6
    half = float(stats.t.ppf((1 + cfg.confidence) / 2, dof)) * se
    gate.estimate = round(diff, 6)
    gate.interval = (round(diff - half, 6), round(diff + half, 6))
    low, high = gate.interval
    if high < -drop_max:
        gate.outcome, gate.rule = FAIL, f"whole interval below -{drop_max} (a clear drop in user scores)"
    elif low >= -drop_max:
        gate.outcome, gate.rule = PASS, f"whole interval at or above -{drop_max}"
    else:
        gate.rule = f"interval [{low:.4g}, {high:.4g}] straddles -{drop_max}"
        gate.need_more_pairs = _need_more(gate.n, gate.interval, diff, -drop_max)
    return gate

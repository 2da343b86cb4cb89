"""The canary's gates under continuous monitoring: the same statistics as ``verdict.py``, decided on
confidence sequences (``sequential.py``) at the levels of an alpha plan, so the controller may look as
often as it likes and a whole canary still errs, either way, with probability at most alpha.

Differences from the single-look gates, each on purpose:
- Divergence: only the tail test, at a threshold t frozen before the stage (the incumbent's A/A 5%
  quantile over the range before the stage began); a threshold re-estimated at every look is covered by
  no sequence. Without enough A/A pairs before the stage, this stage's own are used and the evidence says
  the threshold moved. The Hodges-Lehmann shift has no sequential form and is left to the report.
- Latency: each arm's quantile sequence at half the level; answers that never came (censored at the
  timeout) bound the quantile from below only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..config import GatesConfig
from . import sequential as sq
from .aggregate import RELATIVE_ACCURACY, similarity_histogram
from .divergence import tail_counts
from .intervals import sketch_arrays
from .verdict import INCONCLUSIVE, SKIPPED, Gate, _errors, has_judge_data, judge_counts, judge_skipped_rule

Histogram = Mapping[int, float]


def _decided(
    gate: Gate,
    bounds: tuple[Any, Any],
    threshold: float,
    cfg: GatesConfig,
    plan: sq.AlphaPlan,
    t_star: float,
    *,
    higher_is_worse: bool = True,
    min_pairs: int | None = None,
) -> Gate:
    low, high = float(np.asarray(bounds[0])), float(np.asarray(bounds[1]))
    decision = sq.decide(
        low,
        high,
        threshold,
        n=gate.n,
        min_pairs=cfg.min_pairs if min_pairs is None else min_pairs,
        plan=plan,
        t_star=t_star,
        estimate=gate.estimate,
        higher_is_worse=higher_is_worse,
    )
    gate.interval = (round(low, 6), round(high, 6))
    gate.threshold = threshold
    gate.outcome, gate.rule, gate.need_more_pairs = decision.outcome, decision.rule, decision.need_more_pairs
    gate.method = sq.METHOD
    gate.details["alpha_plan"] = plan.describe()
    return gate


def error_gate(counters: Mapping[str, float], cfg: GatesConfig, plan: sq.AlphaPlan, t_star: float) -> Gate:
    """p_cand - p_inc from the discordant pairs, against the allowance in percentage points."""
    n = int(counters.get("n", 0))
    b, c = counters.get("err:cand_only", 0.0), counters.get("err:inc_only", 0.0)
    estimate = (_errors(dict(counters), "cand") - _errors(dict(counters), "inc")) / n if n else None
    gate = Gate(
        "error_rate",
        INCONCLUSIVE,
        "error rate(candidate) - error rate(incumbent), paired",
        estimate,
        None,
        n,
        None,
        "fraction",
        "",
    )
    gate.details = {"candidate_only": int(b), "incumbent_only": int(c)}
    bounds = sq.gate_cs(lambda a: sq.paired_difference_cs(n, b, c, a, t_star), plan)
    return _decided(gate, bounds, cfg.error_rate_increase_pp / 100.0, cfg, plan, t_star)


def latency_gate(counters: Mapping[str, float], cfg: GatesConfig, plan: sq.AlphaPlan, t_star: float, q: int) -> Gate:
    """The candidate's q-th percentile over the incumbent's plus the allowance, each arm at half the level."""
    pct = cfg.latency_p50_increase_pct if q == 50 else cfg.latency_p99_increase_pct
    inc_low, inc_high = sketch_arrays(counters, "lat", "inc"), sketch_arrays(counters, "lat", "inc", censored=math.inf)
    cand_low, cand_high = (
        sketch_arrays(counters, "lat", "cand"),
        sketch_arrays(counters, "lat", "cand", censored=math.inf),
    )
    n = int(min(inc_low[1][-1] if len(inc_low[1]) else 0, cand_low[1][-1] if len(cand_low[1]) else 0))
    gate = Gate(
        f"latency_p{q}",
        INCONCLUSIVE,
        f"p{q}(candidate) - p{q}(incumbent) - allowance, failures censored",
        None,
        None,
        n,
        None,
        "ms over the allowance",
        "",
    )
    if n == 0:
        return _decided(gate, (-math.inf, math.inf), 0.0, cfg, plan, t_star)

    def cs(alpha: float) -> sq.Interval:
        def arm(low: tuple[np.ndarray, np.ndarray], high: tuple[np.ndarray, np.ndarray]) -> sq.Interval:
            # Censored values count at the timeout for the lower bound, as unbounded for the upper.
            lo = sq.quantile_cs(*low, q / 100.0, alpha / 2.0, t_star, relative_accuracy=RELATIVE_ACCURACY)
            hi = sq.quantile_cs(*high, q / 100.0, alpha / 2.0, t_star, relative_accuracy=RELATIVE_ACCURACY)
            return lo[0], hi[1]

        return sq.quantile_excess_cs(
            arm(inc_low, inc_high), arm(cand_low, cand_high), increase_pct=pct, min_effect=cfg.latency_min_effect_ms
        )

    return _decided(gate, sq.gate_cs(cs, plan), 0.0, cfg, plan, t_star)


def divergence_gate(
    counters: Mapping[str, float], cfg: GatesConfig, plan: sq.AlphaPlan, t_star: float, reference: Histogram | None
) -> Gate:
    """Share of candidate pairs below the A/A's 5% similarity quantile minus the A/A's own share."""
    cand, aa = similarity_histogram(counters, "cand"), similarity_histogram(counters, "aa")
    q = max(cfg.noise_quantiles)
    frozen = reference is not None and sum(reference.values()) >= cfg.min_noise_pairs
    _, _, _, _, t = tail_counts({}, reference if frozen and reference is not None else aa, q)
    k_c, n_c, k_a, n_a, _ = _counts_below(cand, aa, t)
    estimate = (k_c / n_c - k_a / n_a) if n_c and n_a else None
    gate = Gate(
        "divergence",
        INCONCLUSIVE,
        f"share below the A/A {q:.0%} similarity quantile, candidate - A/A",
        estimate,
        None,
        n_c,
        None,
        "fraction",
        "",
    )
    gate.details = {
        "t": t,
        "threshold_from": "A/A before the stage" if frozen else "this stage's A/A (moves)",
        "k_c": k_c,
        "k_a": k_a,
        "noise_pairs": n_a,
    }
    if n_a < cfg.min_noise_pairs:
        gate.threshold, gate.method = cfg.divergence_excess_pp / 100.0, sq.METHOD
        gate.rule = f"{n_a} A/A pairs (minimum {cfg.min_noise_pairs}): the incumbent's own variability is unknown"
        return gate
    bounds = sq.gate_cs(lambda a: sq.two_proportion_cs((n_a, k_a), (n_c, k_c), a, t_star), plan)
    return _decided(gate, bounds, cfg.divergence_excess_pp / 100.0, cfg, plan, t_star)


def _counts_below(cand: Histogram, aa: Histogram, t: float) -> tuple[int, int, int, int, float]:
    from .similarity import WIDTH

    edge = round(t / WIDTH)
    k_c = int(sum(v for b, v in cand.items() if b < edge))
    k_a = int(sum(v for b, v in aa.items() if b < edge))
    return k_c, int(sum(cand.values())), k_a, int(sum(aa.values())), t


def cost_gate(counters: Mapping[str, float], cfg: GatesConfig, plan: sq.AlphaPlan, t_star: float) -> Gate:
    """mean cost(candidate) / mean cost(incumbent) over pairs priced on both arms."""
    n = counters.get("costp_n", 0.0)
    x, y = counters.get("costp_x", 0.0), counters.get("costp_y", 0.0)
    xx, yy, xy = counters.get("costp_xx", 0.0), counters.get("costp_yy", 0.0), counters.get("costp_xy", 0.0)
    estimate = y / x if x else None
    gate = Gate(
        "cost",
        SKIPPED,
        "mean cost(candidate) / mean cost(incumbent)",
        estimate,
        None,
        int(n),
        cfg.cost_ratio_max,
        "ratio",
        "no priced pairs",
    )
    if not n or not x:
        return gate
    bounds = sq.gate_cs(lambda a: sq.ratio_cs(n, x, y, xx, yy, xy, a, t_star), plan)
    return _decided(gate, bounds, cfg.cost_ratio_max, cfg, plan, t_star)


def satisfaction_gate(
    feedback: Mapping[str, float],
    cfg: GatesConfig,
    plan: sq.AlphaPlan,
    t_star: float,
    *,
    min_feedback: int,
    drop_max: float,
) -> Gate:
    """mean score(candidate) - mean score(incumbent), against the allowed drop (higher is better)."""
    stats: dict[str, tuple[float, float, float]] = {
        arm: (feedback.get(f"scored:{arm}", 0.0), feedback.get(f"sum:{arm}", 0.0), feedback.get(f"sumsq:{arm}", 0.0))
        for arm in ("incumbent", "candidate")
    }
    n = int(min(s[0] for s in stats.values()))
    inc, cand = stats["incumbent"], stats["candidate"]
    estimate = cand[1] / cand[0] - inc[1] / inc[0] if cand[0] and inc[0] else None
    gate = Gate(
        "satisfaction",
        SKIPPED,
        "mean score(candidate) - mean score(incumbent)",
        estimate,
        None,
        n,
        -drop_max,
        "score",
        "no scored feedback in range (it compares arms only while the candidate serves)",
    )
    if not any(s[0] for s in stats.values()):
        return gate
    bounds = sq.gate_cs(lambda a: sq.two_sample_cs(inc, cand, a, t_star), plan, higher_is_worse=False)
    return _decided(gate, bounds, -drop_max, cfg, plan, t_star, higher_is_worse=False, min_pairs=min_feedback)


def judge_gate(counters: Mapping[str, float], cfg: GatesConfig, plan: sq.AlphaPlan, t_star: float) -> Gate:
    """The candidate's win rate among non-tie judged pairs minus 50%, on an exact proportion CS (higher is better)."""
    wins, losses, ties = judge_counts(counters)
    n = wins + losses
    gate = Gate(
        "judge",
        SKIPPED,
        "win rate(candidate) - 50% among non-tie judged pairs",
        wins / n - 0.5 if n else None,
        None,
        n,
        -cfg.judge_margin_pp / 100.0,
        "fraction",
        judge_skipped_rule(counters),
    )
    gate.details = {"wins": wins, "losses": losses, "ties": ties}
    if not n and not ties:
        return gate

    def cs(alpha: float) -> sq.Interval:
        low, high = sq.proportion_cs(n, wins, alpha, t_star)
        return low - 0.5, high - 0.5

    bounds = sq.gate_cs(cs, plan, higher_is_worse=False)
    threshold = -cfg.judge_margin_pp / 100.0
    return _decided(gate, bounds, threshold, cfg, plan, t_star, higher_is_worse=False, min_pairs=cfg.judge_min_pairs)


def evaluate(
    counters: Mapping[str, float], cfg: GatesConfig, plan: sq.AlphaPlan, t_star: float, reference: Histogram | None
) -> list[Gate]:
    """Every gate the controller watches, on confidence sequences (the judge's only where a judge looked)."""
    gates = [
        latency_gate(counters, cfg, plan, t_star, 50),
        latency_gate(counters, cfg, plan, t_star, 99),
        error_gate(counters, cfg, plan, t_star),
        divergence_gate(counters, cfg, plan, t_star, reference),
        cost_gate(counters, cfg, plan, t_star),
    ]
    if has_judge_data(counters):
        gates.append(judge_gate(counters, cfg, plan, t_star))
    return gates

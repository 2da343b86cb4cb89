"""The report: summaries, verdicts, drift and examples over a time range (structure in docs/report.md)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..config import CompareConfig
from ..redis import WindowData
from . import monitoring
from . import sequential as sq
from .aggregate import MAPPING, NO_CANDIDATE, merge, quantiles, similarity_histogram
from .report_model import Report
from .similarity import bucket_value
from .verdict import Gate, correct_segments, evaluate, judge_counts, overall, satisfaction_gate

REPORT_VERSION = 2  # 2: one candidate's report with every candidate's verdict (docs/report.md)


def _rate(k: float, n: float) -> float | None:
    return round(k / n, 6) if n else None


def _mean(counters: dict[str, float], name: str) -> float | None:
    n = counters.get(f"{name}_n", 0)
    return round(counters.get(f"{name}_sum", 0) / n, 6) if n else None


def _errors_by_class(counters: dict[str, float], arm: str) -> dict[str, int]:
    prefix = f"out:{arm}:"
    return {k[len(prefix) :]: int(v) for k, v in counters.items() if k.startswith(prefix) and not k.endswith(":ok")}


def _by_prefix(counters: dict[str, float], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: int(v) for k, v in sorted(counters.items()) if k.startswith(prefix) and v}


# Shapes that say "we could not tell what this answer is" (generic JSON and text are answers we compare).
UNRECOGNISED = frozenset({"unknown", "sse", "ndjson"})


def _answers(counters: dict[str, float]) -> dict[str, Any]:
    """Which answer shapes were recognised per arm, what could not be read, what was cut by the cap."""
    arms: dict[str, Any] = {}
    for arm, key in (("incumbent", "inc"), ("candidate", "cand")):
        shapes = _by_prefix(counters, f"shape:{key}:")
        known = sum(v for k, v in shapes.items() if k not in UNRECOGNISED)
        arms[arm] = {
            "shapes": shapes,
            "recognised_share": _rate(known, sum(shapes.values())),
            "parse_errors": _by_prefix(counters, f"parse_err:{key}:"),
            "price_sources": _by_prefix(counters, f"price_src:{key}:"),
        }
    return {
        **arms,
        "truncated": int(counters.get("truncated", 0)),
        "skipped": _by_prefix(counters, "skipped:"),
        "excluded": _by_prefix(counters, "excluded:"),
    }


def summary(counters: dict[str, float], confidence: float = 0.95) -> dict[str, Any]:
    """Everything measured for one slice of traffic, from its merged counters."""
    n = counters.get("n", 0)
    cost_n = {arm: counters.get(f"cost_n:{arm}", 0) for arm in ("inc", "cand")}
    per_1k = {
        arm: round(counters.get(f"cost:{arm}", 0) / cost_n[arm] * 1000, 6) if cost_n[arm] else None
        for arm in ("inc", "cand")
    }
    errors = {arm: _errors_by_class(counters, arm) for arm in ("inc", "cand")}
    return {
        "records": int(counters.get("records", 0)),
        "pairs": int(n),
        "unpaired": int(counters.get("unpaired", 0)),
        "latency_ms": {
            metric: {"incumbent": quantiles(counters, key, "inc"), "candidate": quantiles(counters, key, "cand")}
            for metric, key in (("total", "lat"), ("ttfb", "ttfb"), ("ttft", "ttft"))
        },
        "latency_censored": {
            arm: int(sum(v for k, v in counters.items() if k.startswith(f"sk:latc:{key}:"))) for arm, key in ARMS
        },
        "errors": {
            "incumbent": {"rate": _rate(sum(errors["inc"].values()), n), "by_class": errors["inc"]},
            "candidate": {"rate": _rate(sum(errors["cand"].values()), n), "by_class": errors["cand"]},
            "candidate_only": int(counters.get("err:cand_only", 0)),
            "incumbent_only": int(counters.get("err:inc_only", 0)),
            "both": int(counters.get("err:both", 0)),
            "status_mismatch": int(counters.get("status_mismatch", 0)),
        },
        "cost": {
            "incumbent_per_1k_requests": per_1k["inc"],
            "candidate_per_1k_requests": per_1k["cand"],
            "ratio": round(per_1k["cand"] / per_1k["inc"], 4) if per_1k["inc"] and per_1k["cand"] is not None else None,
            "output_tokens": {
                "incumbent": int(counters.get("tok_out:inc", 0)),
                "candidate": int(counters.get("tok_out:cand", 0)),
            },
            "estimated_share": _rate(
                counters.get("tok_est:cand", 0) + counters.get("tok_est:inc", 0),
                counters.get("tok_n:inc", 0) + counters.get("tok_n:cand", 0),
            ),
        },
        "divergence": {
            "pairs_compared": int(counters.get("div_n", 0)),
            "candidate_rate": _rate(counters.get("div", 0), counters.get("div_n", 0)),
            "noise_pairs": int(counters.get("aa:div_n", 0)),
            "noise_rate": _rate(counters.get("aa:div", 0), counters.get("aa:div_n", 0)),
            "mean_similarity": _rate(counters.get("sim_sum:cand", 0), counters.get("sim_n:cand", 0)),
            "noise_mean_similarity": _rate(counters.get("sim_sum:aa", 0), counters.get("sim_n:aa", 0)),
            # Beside the lexical figures, when compare.semantic embeds the answers (docs/divergence.md).
            "semantic_mean_similarity": _rate(counters.get("ssim_sum:cand", 0), counters.get("ssim_n:cand", 0)),
            "semantic_noise_mean_similarity": _rate(counters.get("ssim_sum:aa", 0), counters.get("ssim_n:aa", 0)),
            "semantic_pairs": int(counters.get("ssim_n:cand", 0)),
            "semantic_noise_pairs": int(counters.get("ssim_n:aa", 0)),
            "semantic_fallbacks": _by_prefix(counters, "semantic_fallback:"),
            "unscored_pairs": int(counters.get("sim_none:cand", 0)),
            "text_similarity_mean": _mean(counters, "tsim"),
            "token_similarity_mean": _mean(counters, "toksim"),
            "embedding_cosine_mean": _mean(counters, "cos"),
            "label_agreement": _rate(counters.get("label_match", 0), counters.get("label_n", 0)),
            "tool_call_agreement": _rate(counters.get("tool_match", 0), counters.get("tool_n", 0)),
            "truncated_pairs": int(counters.get("truncated", 0)),
        },
        "answers": _answers(counters),
        "judge": judge_summary(counters, confidence),
    }


def judge_summary(counters: dict[str, float], confidence: float = 0.95) -> dict[str, Any]:
    """The pairwise judge's figures (docs/report.md): the candidate's wins, losses and ties with the win rate
    among non-tie pairs and its exact interval, the A/A calibration and the judge's position bias."""
    wins, losses, ties = judge_counts(counters)
    n = wins + losses
    interval = None
    if n:
        ci = stats.binomtest(wins, n).proportion_ci(confidence_level=confidence, method="exact")
        interval = [round(float(ci.low), 6), round(float(ci.high), 6)]
    first, second, aa_ties = (int(counters.get(f"judge:aa:{o}", 0)) for o in ("first", "second", "tie"))
    picked_a, picked_b = counters.get("judge:pos:A", 0), counters.get("judge:pos:B", 0)
    return {
        "judged_pairs": wins + losses + ties,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": _rate(wins, n),
        "win_rate_interval": interval,
        "calibration": {
            "pairs": first + second + aa_ties,
            "first": first,
            "second": second,
            "ties": aa_ties,
            "first_share": _rate(first, first + second),
        },
        # Share of non-tie verdicts, over every judged pair, that picked the answer shown first (A): 0.5 is none.
        "position_bias": _rate(picked_a, picked_a + picked_b),
        "skipped": _by_prefix(counters, "judge_skipped:"),
        "cost": round(counters.get("judge_cost", 0.0), 6),
    }


ARMS = (("incumbent", "inc"), ("candidate", "cand"))


def timeseries(windows: Sequence[WindowData]) -> list[dict[str, Any]]:
    """Per window (all segments merged): latency quantiles per arm, error and divergence rates, cost."""
    by_window: dict[int, list[dict[str, float]]] = defaultdict(list)
    for data in windows:
        by_window[data.window].append(data.counters)
    points = []
    for window in sorted(by_window):
        c = merge(by_window[window])
        n = c.get("n", 0)
        point: dict[str, Any] = {"window": window, "pairs": int(n)}
        for arm, key in ARMS:
            point[f"latency_ms.{arm}"] = quantiles(c, "lat", key)
            point[f"error_rate.{arm}"] = _rate(_count(c, f"out:{key}:"), n)
            cost_n = c.get(f"cost_n:{key}", 0)
            point[f"cost_per_1k.{arm}"] = round(c.get(f"cost:{key}", 0) / cost_n * 1000, 6) if cost_n else None
        point["divergence_rate.candidate"] = _rate(c.get("div", 0), c.get("div_n", 0))
        point["divergence_rate.noise"] = _rate(c.get("aa:div", 0), c.get("aa:div_n", 0))
        point["mean_similarity.candidate"] = _rate(c.get("sim_sum:cand", 0), c.get("sim_n:cand", 0))
        point["mean_similarity.noise"] = _rate(c.get("sim_sum:aa", 0), c.get("sim_n:aa", 0))
        points.append(point)
    return points


def distribution(counters: dict[str, float], name: str, arm: str) -> list[list[float]]:
    """[value_ms, count] per DDSketch bucket, ascending: the shape of a latency distribution."""
    prefix = f"sk:{name}:{arm}:"
    buckets = [
        (0.0 if k[len(prefix) :] == "z" else MAPPING.value(int(k[len(prefix) :])), v)
        for k, v in counters.items()
        if k.startswith(prefix) and v > 0
    ]
    return [[round(value, 3), int(count)] for value, count in sorted(buckets)]


def satisfaction_summary(feedback: dict[str, float], confidence: float) -> dict[str, Any]:
    """Per arm: feedback count, scored count, mean score with a t interval, and label counts."""
    arms: dict[str, Any] = {}
    for arm in ("incumbent", "candidate"):
        n = int(feedback.get(f"scored:{arm}", 0))
        mean = feedback.get(f"sum:{arm}", 0.0) / n if n else None
        interval = None
        if n > 1 and mean is not None:
            variance = max((feedback.get(f"sumsq:{arm}", 0.0) - n * mean**2) / (n - 1), 0.0)
            half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * (variance / n) ** 0.5
            interval = [round(mean - half, 6), round(mean + half, 6)]
        prefix = f"label:{arm}:"
        arms[arm] = {
            "feedback": int(feedback.get(f"n:{arm}", 0)),
            "scored": n,
            "mean_score": None if mean is None else round(mean, 6),
            "interval": interval,
            "labels": {k[len(prefix) :]: int(v) for k, v in feedback.items() if k.startswith(prefix)},
        }
    return arms


def _drift(windows: Sequence[WindowData], threshold_pct: float) -> list[dict[str, Any]]:
    """Each key metric per window, flagged when the last third of the range differs from the first."""
    by_window: dict[int, list[dict[str, float]]] = defaultdict(list)
    for data in windows:
        by_window[data.window].append(data.counters)
    ordered = sorted(by_window)
    merged = [merge(by_window[w]) for w in ordered]
    metrics: list[dict[str, Any]] = []
    third = max(1, len(ordered) // 3)
    first, last = merge(merged[:third]), merge(merged[-third:])
    for arm, label in (("inc", "incumbent"), ("cand", "candidate")):
        series = [quantiles(c, "lat", arm, (0.5,))["p50"] for c in merged]
        a, b = quantiles(first, "lat", arm, (0.5,))["p50"], quantiles(last, "lat", arm, (0.5,))["p50"]
        change = None if not a or b is None else round((b - a) / a * 100, 2)
        metrics.append(
            {
                "metric": f"latency_p50_ms.{label}",
                "series": series,
                "first": a,
                "last": b,
                "change_pct": change,
                "drift": len(ordered) >= 3 and change is not None and abs(change) > threshold_pct,
            }
        )
        metrics.append(_rate_drift(f"error_rate.{label}", merged, first, last, f"out:{arm}:", "n", ordered))
    metrics.append(_rate_drift("divergence_rate.candidate", merged, first, last, "div", "div_n", ordered))
    for item in metrics:
        item["windows"] = ordered
    return metrics


def _count(counters: dict[str, float], key: str) -> float:
    if key.endswith(":"):
        return sum(v for k, v in counters.items() if k.startswith(key) and not k.endswith(":ok"))
    return counters.get(key, 0)


def _rate_drift(
    name: str,
    merged: list[dict[str, float]],
    first: dict[str, float],
    last: dict[str, float],
    key: str,
    total: str,
    ordered: list[int],
) -> dict[str, Any]:
    series = [_rate(_count(c, key), c.get(total, 0)) for c in merged]
    k1, n1, k2, n2 = _count(first, key), first.get(total, 0), _count(last, key), last.get(total, 0)
    p_value = None
    if n1 and n2 and len(ordered) >= 3:
        table = np.array([[k1, n1 - k1], [k2, n2 - k2]], dtype=int)
        p_value = float(stats.fisher_exact(table).pvalue)
    return {
        "metric": name,
        "series": series,
        "first": _rate(k1, n1),
        "last": _rate(k2, n2),
        "fisher_p": p_value,
        "drift": p_value is not None and p_value < 0.01,
    }


def build(
    windows: Sequence[WindowData],
    segments: dict[str, dict[str, Any]],
    cfg: CompareConfig,
    *,
    since: float,
    until: float,
    segment_filter: dict[str, str] | None = None,
    examples: int = 10,
    feedback: dict[str, float] | None = None,
    min_feedback: int = 30,
    satisfaction_drop_max: float = 0.05,
    candidate: str | None = None,
    monitor: Monitor | None = None,
) -> Report:
    """The report of one candidate against the incumbent (``candidate``, else the first one seen) for the
    windows in range (optionally only segments matching the filter), with every candidate's verdict."""
    if segment_filter:
        windows = [w for w in windows if _matches(segments.get(w.segment, {}), segment_filter)]
    by_candidate: dict[str, list[WindowData]] = defaultdict(list)
    for data in windows:
        by_candidate[candidate_of(segments.get(data.segment, {}))].append(data)
    names = sorted(n for n in by_candidate if n != NO_CANDIDATE)
    selected = candidate if candidate is not None else (names[0] if names else NO_CANDIDATE)
    others = [_candidate_brief(n, by_candidate[n], cfg) for n in names]
    report = _build_one(
        by_candidate.get(selected, []),
        segments,
        cfg,
        since=since,
        until=until,
        examples=examples,
        feedback=feedback,
        min_feedback=min_feedback,
        satisfaction_drop_max=satisfaction_drop_max,
        monitor=monitor,
    )
    return Report.model_validate({"version": REPORT_VERSION, "candidate": selected, "candidates": others, **report})


@dataclass(frozen=True, slots=True)
class Monitor:
    """How the canary controller looks: the alpha plan of its confidence sequences, their tuning, and the
    A/A similarity from before the stage (the divergence threshold, frozen for the stage)."""

    plan: sq.AlphaPlan
    t_star: float = sq.DEFAULT_T_STAR
    reference: dict[int, float] | None = None


def candidate_of(segment: dict[str, Any]) -> str:
    """The candidate a segment compares (segments written before there were several are "candidate")."""
    return str(segment.get("candidate", "candidate"))


def _candidate_brief(name: str, windows: Sequence[WindowData], cfg: CompareConfig) -> dict[str, Any]:
    total = merge(w.counters for w in windows)
    gates = evaluate(total, [p for w in windows for p in w.pairs], cfg.gates)
    return {
        "name": name,
        "records": int(total.get("records", 0)),
        "pairs": int(total.get("n", 0)),
        "verdict": overall(gates),
        "gates": {g.name: g.outcome for g in gates},
    }


def _build_one(
    windows: Sequence[WindowData],
    segments: dict[str, dict[str, Any]],
    cfg: CompareConfig,
    *,
    since: float,
    until: float,
    examples: int,
    feedback: dict[str, float] | None,
    min_feedback: int,
    satisfaction_drop_max: float,
    monitor: Monitor | None = None,
) -> dict[str, Any]:
    by_segment: dict[str, list[WindowData]] = defaultdict(list)
    for data in windows:
        by_segment[data.segment].append(data)
    total = merge(w.counters for w in windows)
    all_pairs = [p for w in windows for p in w.pairs]
    if monitor is not None:  # the canary controller: decisions that stay valid however often it looks
        gates = monitoring.evaluate(total, cfg.gates, monitor.plan, monitor.t_star, monitor.reference)
        satisfaction = monitoring.satisfaction_gate(
            feedback or {},
            cfg.gates,
            monitor.plan,
            monitor.t_star,
            min_feedback=min_feedback,
            drop_max=satisfaction_drop_max,
        )
    else:
        gates = evaluate(total, all_pairs, cfg.gates)
        satisfaction = satisfaction_gate(
            feedback or {}, cfg.gates, min_feedback=min_feedback, drop_max=satisfaction_drop_max
        )
    gates.append(satisfaction)
    segment_reports: list[dict[str, Any]] = []
    segment_gates: list[list[Gate]] = []
    for segment_id, items in sorted(by_segment.items()):
        counters = merge(w.counters for w in items)
        seg_gates = evaluate(counters, [p for w in items for p in w.pairs], cfg.gates)
        segment_gates.append(seg_gates)
        segment_reports.append(
            {
                "id": segment_id,
                "segment": segments.get(segment_id, {}),
                "summary": summary(counters, cfg.gates.confidence),
            }
        )
    correct_segments(segment_gates, cfg.gates.fdr)
    ranked = sorted((e for w in windows for e in w.examples), key=_example_rank, reverse=True)[:examples]
    _attach_examples(gates, ranked)
    return {
        "generated_at": time.time(),
        "range": {"since": since, "until": until, "windows": len({w.window for w in windows})},
        "summary": {
            **summary(total, cfg.gates.confidence),
            "satisfaction": satisfaction_summary(feedback or {}, cfg.gates.confidence),
        },
        "verdict": {"outcome": overall(gates), "gates": [g.as_dict() for g in gates]},
        "segments": [
            {**s, "verdict": overall(g), "gates": [gate.as_dict() for gate in g]}
            for s, g in zip(segment_reports, segment_gates, strict=True)
        ],
        "drift": _drift(windows, cfg.drift_threshold_pct),
        "timeseries": timeseries(windows),
        "distributions": {
            "latency_ms": {arm: distribution(total, "lat", key) for arm, key in ARMS},
            "similarity": {
                arm: [[bucket_value(b), int(n)] for b, n in sorted(similarity_histogram(total, key).items())]
                for arm, key in (("candidate", "cand"), ("noise", "aa"))
            },
        },
        "examples": ranked,
        "notes": [
            "Shadow answers never reach users: divergence compares outputs, not user satisfaction.",
            "Divergence excludes pairs where either arm failed; those count as errors.",
            "Divergence compares candidate-vs-incumbent similarity with the incumbent's own A/A similarity "
            "(it samples too); the exact-match rate is shown as a figure, not gated.",
            "User feedback only compares arms while the candidate serves some users (canary stages): "
            "during shadowing every answer users saw came from the incumbent.",
        ],
    }


def _matches(segment: dict[str, Any], wanted: dict[str, str]) -> bool:
    return all(str(segment.get(key)).lower() == value.lower() for key, value in wanted.items())


def _example_rank(example: dict[str, Any]) -> float:
    failed = example["incumbent"]["outcome"] != example["candidate"]["outcome"]
    return (1.0 if failed else 0.0) + 1.0 - float(example["metrics"].get("similarity") or 0.0)


def _attach_examples(gates: list[Gate], ranked: list[dict[str, Any]]) -> None:
    errors = [e["request_id"] for e in ranked if e["incumbent"]["outcome"] != e["candidate"]["outcome"]]
    divergent = [e["request_id"] for e in ranked if e["incumbent"]["outcome"] == e["candidate"]["outcome"]]
    for gate in gates:
        if gate.name == "error_rate":
            gate.examples = errors[:5]
        elif gate.name == "divergence":
            gate.examples = divergent[:5]

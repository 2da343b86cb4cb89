"""Fold pair metrics into mergeable per-window, per-segment aggregates (pure; the store writes them).

An aggregate is a flat map of counters, so merging windows, segments or workers is addition and
Redis can apply it with ``HINCRBYFLOAT``. Latency distributions are DDSketch buckets (``sk:…:<key>``
counters keyed by the sketch's logarithmic mapping, 1% relative accuracy): summing bucket counts is
exactly merging sketches.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

from .measures import PairMetrics, Tolerance, arm_cost, compare
from .parse import Arm, Record
from .pricing import PriceBook
from .similarity import BELOW_ONE, bucket
from .similarity import score as score_pair

RELATIVE_ACCURACY = 0.01
MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)
SKETCHED = ("lat", "ttfb", "ttft")
EXAMPLE_TEXT_CAP = 2000


NO_CANDIDATE = "-"  # the segment of records no candidate was asked about


@dataclass(frozen=True, slots=True)
class Segment:
    """The slice of traffic a record belongs to, for one candidate (each is compared on its own)."""

    route: str
    model: str
    streaming: bool
    candidate: str = "candidate"

    @property
    def id(self) -> str:
        return _segment_id(self.route, self.model, self.streaming, self.candidate)

    def json(self) -> bytes:
        return _segment_json(self.route, self.model, self.streaming, self.candidate)

    def label(self) -> str:
        return f"{self.candidate}: {self.route} model={self.model} {'stream' if self.streaming else 'plain'}"


def _segment_json(route: str, model: str, streaming: bool, candidate: str) -> bytes:
    return orjson.dumps({"route": route, "model": model, "streaming": streaming, "candidate": candidate})


@functools.lru_cache(maxsize=4096)
def _segment_id(route: str, model: str, streaming: bool, candidate: str) -> str:
    return hashlib.blake2b(_segment_json(route, model, streaming, candidate), digest_size=6).hexdigest()


@dataclass(frozen=True, slots=True)
class Settings:
    """What the aggregation needs from the config: tolerances and each arm's prices by name."""

    window_seconds: int
    tolerance: Tolerance
    prices: Mapping[str, PriceBook]
    censor_ms: Mapping[str, float] = field(default_factory=dict)  # per arm: its timeout, where failures count

    def book(self, arm: str) -> PriceBook:
        """The arm's prices; an arm the config does not name is priced from the maintained list."""
        return self.prices.get(arm) or _LIST_PRICES

    def censor(self, arm: str) -> float:
        """Where an answer that never came is counted in the arm's latency (its timeout: a lower bound)."""
        return self.censor_ms.get(arm, DEFAULT_CENSOR_MS)


DEFAULT_CENSOR_MS = 60_000.0


_LIST_PRICES = PriceBook(None)


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one record adds to one candidate's window and segment."""

    request_id: str
    dedup_id: str  # request id and candidate: a record counts once per candidate, however often it is read
    window: int
    segment: Segment
    counters: dict[str, float]
    pair: list[float] | None  # a reservoir sample of paired values, see PAIR_FIELDS
    example_score: float | None
    example: bytes | None


# The paired values each window keeps a uniform reservoir sample of (for bootstrap intervals).
PAIR_FIELDS = ("lat_inc", "lat_cand", "ttft_inc", "ttft_cand", "cost_inc", "cost_cand", "err_inc", "err_cand", "div")


def sketch_key(value: float) -> str:
    """The DDSketch bucket of a positive value ('z' holds zeros and negatives)."""
    return str(MAPPING.key(value)) if value > 0 else "z"


def _arms(record: Record) -> tuple[Arm | None, dict[str, Arm], Arm | None]:
    """(incumbent, candidates by name, incumbent's A/A noise copy) whatever role each played."""
    incumbent = noise = None
    candidates: dict[str, Arm] = {}
    for arm in record.arms.values():
        if arm.role == "noise":
            noise = arm
        elif arm.upstream == "incumbent":
            incumbent = arm
        else:
            candidates[arm.upstream] = arm
    return incumbent, candidates, noise


PairKey = tuple[str, str]  # (request id, "cand:<candidate>" or "aa"): one compared pair of a record
NOISE_PAIR = "aa"


def pair_key(request_id: str, candidate: str | None) -> PairKey:
    """The key of a record's pair: incumbent vs the named candidate, or (None) vs its A/A copy."""
    return (request_id, NOISE_PAIR if candidate is None else f"cand:{candidate}")


@dataclass(frozen=True, slots=True)
class Semantic:
    """Semantic similarity scored before aggregation (``semantic.py``): per pair, a cosine in [0, 1], or
    the reason it fell back to the lexical score alone (the endpoint was slow, down, or answered garbage)."""

    scores: Mapping[PairKey, float] = field(default_factory=dict)
    fallbacks: Mapping[PairKey, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Judged:
    """Pairwise judgements made before aggregation (``judge.py``): per judged pair, who won from the view of
    the pair's second answer ("win", "loss", "tie": the candidate's view; for the A/A pair, "first",
    "second" or "tie" by the position the judge saw) and the position it picked ("A", "B" or "tie"); per
    pair sampled but not judged, the reason (``budget``, ``timeout``, ...)."""

    outcomes: Mapping[PairKey, str] = field(default_factory=dict)
    positions: Mapping[PairKey, str] = field(default_factory=dict)
    skipped: Mapping[PairKey, str] = field(default_factory=dict)
    cost: Mapping[PairKey, float] = field(default_factory=dict)


def compared_pairs(record: Record) -> list[tuple[PairKey, Arm, Arm]]:
    """The record's pairs whose answers are compared (both clean and whole): incumbent vs each candidate,
    and incumbent vs its A/A copy. The same pairs the similarity histograms count."""
    incumbent, candidates, noise = _arms(record)
    if incumbent is None or not _whole(incumbent):
        return []
    others = [(pair_key(record.request_id, name), arm) for name, arm in sorted(candidates.items())]
    if noise is not None:
        others.append((pair_key(record.request_id, None), noise))
    return [(key, incumbent, arm) for key, arm in others if _whole(arm)]


def _whole(arm: Arm) -> bool:
    return arm.outcome is None and not arm.output.truncated


def contributions(
    record: Record, settings: Settings, semantic: Semantic | None = None, judged: Judged | None = None
) -> list[Contribution]:
    """What one record contributes to each candidate it concerns: mirrored to it, or skipped for it.
    With ``semantic``, its pairs' semantic scores (or fallbacks) are counted beside the lexical ones; with
    ``judged``, the judge's verdicts on its pairs (the A/A pair's in every candidate's contribution)."""
    incumbent, candidates, noise = _arms(record)
    names = sorted(candidates.keys() | {n for n in record.skipped if n != "incumbent"}) or [NO_CANDIDATE]
    noise_metrics = None
    if incumbent is not None and noise is not None:
        noise_metrics = NoisePair(compare(incumbent, noise, settings.tolerance), incumbent, noise, settings.tolerance)
    found = [contribution(record, settings, name, incumbent, candidates.get(name), noise_metrics) for name in names]
    if semantic is not None:
        for item in found:
            _semantic_counters(item.counters, semantic, pair_key(record.request_id, item.segment.candidate), "cand")
            if noise_metrics is not None:
                _semantic_counters(item.counters, semantic, pair_key(record.request_id, None), "aa")
    if judged is not None:
        for item in found:
            _judge_counters(item.counters, judged, pair_key(record.request_id, item.segment.candidate), "cand")
            _judge_counters(item.counters, judged, pair_key(record.request_id, None), "aa")
    return found


# Judge counters (``judge.py``): judge:cand:win|loss|tie, judge:aa:first|second|tie, judge:pos:A|B|tie
# (the position picked, over every judged pair), judge_cost (what the judge charged) and
# judge_skipped:<reason> for pairs sampled but not judged.
def _judge_counters(c: dict[str, float], judged: Judged, key: PairKey, arm: str) -> None:
    outcome = judged.outcomes.get(key)
    if outcome is not None:
        c[f"judge:{arm}:{outcome}"] = 1
        position = f"judge:pos:{judged.positions.get(key, 'tie')}"
        c[position] = c.get(position, 0) + 1
        c["judge_cost"] = c.get("judge_cost", 0.0) + judged.cost.get(key, 0.0)
    elif (reason := judged.skipped.get(key)) is not None:
        name = f"judge_skipped:{reason}"
        c[name] = c.get(name, 0) + 1


def contribution(
    record: Record,
    settings: Settings,
    name: str,
    incumbent: Arm | None,
    candidate: Arm | None,
    noise: NoisePair | None,
) -> Contribution:
    """Counters, reservoir sample and example that one record contributes for one candidate."""
    window = int(record.time // settings.window_seconds) * settings.window_seconds
    segment = Segment(record.route, record.model, record.streaming, name)
    counters: dict[str, float] = {"records": 1}
    pair = example = score = None
    excluded = _not_an_arms_fault(incumbent, candidate)
    if excluded is not None:
        # The client left, or we cancelled: neither arm failed, so the pair says nothing about either.
        counters[f"excluded:{excluded}"] = 1
    elif incumbent is not None and candidate is not None:
        metrics = compare(incumbent, candidate, settings.tolerance)
        value = _pair_counters(counters, metrics, incumbent, candidate, record, settings)
        pair = _pair_sample(metrics, incumbent, candidate, counters)
        if metrics.diverged or metrics.outcome_base != metrics.outcome_other:
            similar = value if value is not None else metrics.similarity
            score = round(1.0 - similar, 6) + (1.0 if metrics.outcome_base != metrics.outcome_other else 0)
            example = _example(record, metrics, incumbent, candidate, similar)
    else:
        counters["unpaired"] = 1
        # Missing the candidate's mirror, or (while it serves in a canary) the incumbent's reverse shadow.
        skipped = record.skipped.get(name) if candidate is None else record.skipped.get("incumbent")
        if skipped:
            counters[f"skipped:{skipped}"] = 1
    for arm_name, arm in (("inc", incumbent), ("cand", candidate)):
        if arm is not None and arm.status is not None:  # an answer arrived: which shape, what was unreadable
            counters[f"shape:{arm_name}:{arm.output.shape}"] = 1
            if arm.output.parse_error:
                counters[f"parse_err:{arm_name}:{arm.output.parse_error}"] = 1
    if noise is not None:
        _noise_counters(counters, noise)
    return Contribution(
        record.request_id, f"{record.request_id}|{name}", window, segment, counters, pair, score, example
    )


# Outcomes that are no arm's doing: a client that went away, a proxy that cancelled at shutdown.
NOT_AN_ARMS_FAULT = frozenset({"client_disconnected", "cancelled_at_shutdown"})


def _not_an_arms_fault(*arms: Arm | None) -> str | None:
    for arm in arms:
        if arm is not None and arm.error in NOT_AN_ARMS_FAULT:
            return arm.error
    return None


def _add_sketch(counters: dict[str, float], name: str, arm: str, value: float | None) -> None:
    if value is not None:
        key = f"sk:{name}:{arm}:{sketch_key(value)}"
        counters[key] = counters.get(key, 0) + 1


@dataclass(frozen=True, slots=True)
class NoisePair:
    """The incumbent against its own A/A copy: exact-match metrics and, when both answered whole, a score."""

    metrics: PairMetrics
    score: float | None
    truncated: bool

    def __init__(self, metrics: PairMetrics, incumbent: Arm, noise: Arm, tol: Tolerance) -> None:
        clean = metrics.outcome_base is None and metrics.outcome_other is None
        truncated = incumbent.output.truncated or noise.output.truncated
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "truncated", truncated)
        object.__setattr__(
            self, "score", score_pair(incumbent.output, noise.output, tol) if clean and not truncated else None
        )


# Similarity histograms (mergeable): sim:<arm>:<bucket> with arm "cand" (candidate vs incumbent) or
# "aa" (incumbent vs its A/A copy); sim_none:<arm> counts pairs that could not be scored.
def similarity_histogram(counters: Mapping[str, float], arm: str) -> dict[int, float]:
    prefix = f"sim:{arm}:"
    return {int(k[len(prefix) :]): v for k, v in counters.items() if k.startswith(prefix) and v}


def _similarity_counters(c: dict[str, float], arm: str, value: float | None) -> None:
    if value is None:
        c[f"sim_none:{arm}"] = 1
        return
    c[f"sim:{arm}:{bucket(value)}"] = 1
    c[f"sim_sum:{arm}"] = value
    c[f"sim_n:{arm}"] = 1


def _pair_counters(
    c: dict[str, float], m: PairMetrics, inc: Arm, cand: Arm, record: Record, s: Settings
) -> float | None:
    """Every counter of one pair; the pair's similarity score when both answered whole."""
    value = None
    c["n"] = 1
    c[f"out:inc:{m.outcome_base or 'ok'}"] = 1
    c[f"out:cand:{m.outcome_other or 'ok'}"] = 1
    if m.outcome_base and m.outcome_other:
        c["err:both"] = 1
    elif m.outcome_other:
        c["err:cand_only"] = 1
    elif m.outcome_base:
        c["err:inc_only"] = 1
    if not m.status_match:
        c["status_mismatch"] = 1
    if m.outcome_base is None and m.outcome_other is None:
        if inc.output.truncated or cand.output.truncated:
            # Cut by the capture cap: timings and status hold, but the answers are not whole.
            c["truncated"] = 1
        else:
            value = score_pair(inc.output, cand.output, s.tolerance)
            _divergence_counters(c, m, value)
        amounts = []
        for arm_name, arm, book in (("inc", inc, s.book("incumbent")), ("cand", cand, s.book(cand.upstream))):
            charge = arm_cost(arm, record, book)
            amounts.append(charge.amount)
            c[f"tok_out:{arm_name}"] = charge.output_tokens
            c[f"tok_n:{arm_name}"] = 1
            c[f"price_src:{arm_name}:{charge.source}"] = 1
            if charge.amount is not None:
                c[f"cost:{arm_name}"] = charge.amount
                c[f"cost_n:{arm_name}"] = 1
            if charge.estimated:
                c[f"tok_est:{arm_name}"] = 1
        _cost_pair_counters(c, amounts[0], amounts[1])
    for arm_name, arm, censor in (("inc", inc, s.censor("incumbent")), ("cand", cand, s.censor(cand.upstream))):
        if arm.outcome is None:
            _add_sketch(c, "lat", arm_name, arm.duration_ms)
            _add_sketch(c, "ttfb", arm_name, arm.ttfb_ms)
            _add_sketch(c, "ttft", arm_name, arm.ttft_ms)
        else:
            # No answer: its latency is at least the arm's timeout (right-censored there), so a tail of
            # timeouts or errors moves the arm's high quantiles instead of vanishing from them.
            # Kept in a sketch of their own ("latc"): the gates merge it in, distributions of answers do not.
            _add_sketch(c, "latc", arm_name, max(arm.duration_ms or 0.0, censor))
    return value


# Semantic histograms (``semantic.py``), next to the lexical ones: ssim:<arm>:<bucket>, ssim_sum:<arm>,
# ssim_n:<arm>; semantic_fallback:<reason> counts pairs scored lexically only because the endpoint failed.
def _semantic_counters(c: dict[str, float], semantic: Semantic, key: PairKey, arm: str) -> None:
    value = semantic.scores.get(key)
    if value is not None:
        # As in the lexical histogram, the top bucket holds identical answers only (the lexical score says
        # which): a paraphrase with a cosine of 1.0 counts just below it.
        identical = c.get(f"sim:{arm}:{bucket(1.0)}", 0) > 0
        value = 1.0 if identical else min(max(value, 0.0), BELOW_ONE)
        c[f"ssim:{arm}:{bucket(value)}"] = 1
        c[f"ssim_sum:{arm}"] = value
        c[f"ssim_n:{arm}"] = 1
    elif (reason := semantic.fallbacks.get(key)) is not None:
        name = f"semantic_fallback:{reason}"
        c[name] = c.get(name, 0) + 1


def _cost_pair_counters(c: dict[str, float], x: float | None, y: float | None) -> None:
    """Sums for the cost ratio's interval over pairs priced on both arms (x incumbent, y candidate)."""
    if x is None or y is None:
        return
    c.update(costp_n=1, costp_x=x, costp_y=y, costp_xx=x * x, costp_yy=y * y, costp_xy=x * y)


def _divergence_counters(c: dict[str, float], m: PairMetrics, value: float | None) -> None:
    c["div_n"] = 1
    c["div"] = int(m.diverged)  # the exact-match figure, reported beside the gate (not gated)
    _similarity_counters(c, "cand", value)
    for name, value in (("tsim", m.text_similarity), ("toksim", m.token_similarity), ("cos", m.embedding_cosine)):
        if value is not None:
            c[f"{name}_sum"] = value
            c[f"{name}_n"] = 1
    for name, flag in (("label", m.label_match), ("tool", m.tool_calls_match)):
        if flag is not None:
            c[f"{name}_n"] = 1
            c[f"{name}_match"] = int(flag)


def _noise_counters(c: dict[str, float], noise: NoisePair) -> None:
    m = noise.metrics
    c["aa:n"] = 1
    if m.outcome_base is None and m.outcome_other is None:
        if noise.truncated:
            c["aa:truncated"] = 1
            return
        c["aa:div_n"] = 1
        c["aa:div"] = int(m.diverged)
        _similarity_counters(c, "aa", noise.score)


def _pair_sample(m: PairMetrics, inc: Arm, cand: Arm, counters: dict[str, float]) -> list[float] | None:
    if m.outcome_base is not None or m.outcome_other is not None:
        return [-1, -1, -1, -1, -1, -1, float(m.outcome_base is not None), float(m.outcome_other is not None), 0]
    if inc.duration_ms is None or cand.duration_ms is None:
        return None
    return [
        inc.duration_ms,
        cand.duration_ms,
        inc.ttft_ms if inc.ttft_ms is not None else -1,
        cand.ttft_ms if cand.ttft_ms is not None else -1,
        counters.get("cost:inc", -1.0),  # -1: no price known for this arm's model (left out of the cost gate)
        counters.get("cost:cand", -1.0),
        0.0,
        0.0,
        float(m.diverged),
    ]


def _shown(arm: Arm) -> Any:
    output = arm.output
    if output.text is not None:
        return output.text[:EXAMPLE_TEXT_CAP]
    if output.document is not None:
        return orjson.dumps(output.document)[:EXAMPLE_TEXT_CAP].decode(errors="replace")
    return None


def _example(record: Record, m: PairMetrics, inc: Arm, cand: Arm, similar: float) -> bytes:
    return orjson.dumps(
        {
            "request_id": record.request_id,
            "client_request_id": record.client_request_id,
            "time": record.time,
            "route": record.route,
            "model": record.model,
            "incumbent": {"status": inc.status, "outcome": m.outcome_base, "output": _shown(inc)},
            "candidate": {"status": cand.status, "outcome": m.outcome_other, "output": _shown(cand)},
            "metrics": {
                "similarity": round(similar, 4),
                "text_similarity": m.text_similarity,
                "token_similarity": m.token_similarity,
                "field_diffs": list(m.field_diffs),
                "latency_delta_ms": m.latency_delta_ms,
            },
        }
    )


def merge(maps: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum counter maps (windows, segments, workers): the aggregate of their union."""
    total: dict[str, float] = {}
    for counters in maps:
        for key, value in counters.items():
            total[key] = total.get(key, 0.0) + value
    return total


def sketch(counters: Mapping[str, float], name: str, arm: str) -> DDSketch:
    """Rebuild the DDSketch of one metric and arm from its bucket counters."""
    result = DDSketch(RELATIVE_ACCURACY)
    prefix = f"sk:{name}:{arm}:"
    for key, count in counters.items():
        if key.startswith(prefix) and count > 0:
            bucket = key[len(prefix) :]
            result.add(0.0 if bucket == "z" else MAPPING.value(int(bucket)), count)
    return result


def quantiles(
    counters: Mapping[str, float], name: str, arm: str, qs: Iterable[float] = (0.5, 0.95, 0.99)
) -> dict[str, Any]:
    """p50/p95/p99 (and count) of a sketched metric, in ms; None where there are no values."""
    built = sketch(counters, name, arm)
    out: dict[str, Any] = {"n": int(built.count)}
    for q in qs:
        value = built.get_quantile_value(q) if built.count else None
        out[f"p{round(q * 100):d}"] = None if value is None else round(value, 3)
    return out

"""What ``/metrics`` shows: this process's metrics (or every worker's, in multiprocess mode) plus a
snapshot of Redis-held state taken at scrape time: comparator backlog and throughput, verdict per gate.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .comparator.report_model import Report
from .metrics import Metrics
from .redis import AggregateReader, StoreUnavailable

OUTCOME_VALUE = {"pass": 1.0, "inconclusive": 0.5, "fail": 0.0, "skipped": -1.0}


class _Forward(Collector):
    """Yields another registry's metrics (this process's own)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return self._source.collect()


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


async def redis_families(reader: AggregateReader, group: str, within: float = 1.0) -> list[Metric]:
    """Comparator and verdict state read from Redis; empty (and counted as such) when Redis does not answer."""
    up = GaugeMetricFamily("shadow_proxy_redis_snapshot_ok", "Whether the scrape could read comparator state.")
    try:
        async with asyncio.timeout(within):
            backlog = await reader.backlog(group)
            workers = await reader.workers()
            verdict = await reader.latest_verdict()
    except (TimeoutError, StoreUnavailable):
        up.add_metric([], 0.0)
        return [up]
    up.add_metric([], 1.0)
    families: list[Metric] = [up]
    pending = GaugeMetricFamily("shadow_proxy_comparator_pending", "Records delivered to comparators, not acked.")
    pending.add_metric([], float(backlog["pending"] or 0))
    lag = GaugeMetricFamily(
        "shadow_proxy_comparator_lag", "Records added to the stream and not yet delivered to the comparator group."
    )
    lag.add_metric([], float(backlog["lag"] or 0))
    stream = GaugeMetricFamily("shadow_proxy_records_stream_length", "Entries in the records stream.")
    stream.add_metric([], float(backlog["length"] or 0))
    lost = CounterMetricFamily(
        "shadow_proxy_records_lost",
        "Records that left the stream unprocessed, by reason: trimmed (MAXLEN) before the comparator group read "
        "them, or deleted while pending.",
        labels=["reason"],
    )
    lost.add_metric(["trimmed"], float(backlog["trimmed"] or 0))
    lost.add_metric(["deleted"], float(backlog["deleted"] or 0))
    applied = CounterMetricFamily(
        "shadow_proxy_comparator_applied", "Records applied by each live comparator.", labels=["consumer"]
    )
    parse_errors = CounterMetricFamily(
        "shadow_proxy_comparator_parse_errors",
        "Answers of a recognised shape with a part that could not be read, by live comparator and reason.",
        labels=["consumer", "reason"],
    )
    fallbacks = CounterMetricFamily(
        "shadow_proxy_comparator_semantic_fallbacks",
        "Batches scored lexically because the embeddings endpoint failed, by live comparator and reason.",
        labels=["consumer", "reason"],
    )
    judge_skipped = CounterMetricFamily(
        "shadow_proxy_comparator_judge_skipped",
        "Pairs sampled for the judge but not judged, by live comparator and reason (budget, timeout, ...).",
        labels=["consumer", "reason"],
    )
    judged = CounterMetricFamily(
        "shadow_proxy_comparator_judged", "Pairs the judge gave a verdict on, by live comparator.", labels=["consumer"]
    )
    for worker in workers:
        consumer = str(worker.get("consumer"))
        applied.add_metric([consumer], float(worker.get("applied", 0)))
        for reason, count in (worker.get("parse_errors") or {}).items():
            parse_errors.add_metric([consumer, str(reason)], float(count))
        for reason, count in (worker.get("semantic_fallbacks") or {}).items():
            fallbacks.add_metric([consumer, str(reason)], float(count))
        judged.add_metric([consumer], float(worker.get("judged", 0)))
        for reason, count in (worker.get("judge_skipped") or {}).items():
            judge_skipped.add_metric([consumer, str(reason)], float(count))
    families += [pending, lag, stream, lost, applied, parse_errors, fallbacks, judged, judge_skipped]
    if verdict is not None:
        families += _verdict_families(verdict)
    return families


def _verdict_families(report: Report) -> list[Metric]:
    gates = GaugeMetricFamily(
        "shadow_proxy_verdict_gate",
        "Latest stored verdict per gate: 1 pass, 0.5 inconclusive, 0 fail, -1 skipped.",
        labels=["gate"],
    )
    for gate in report.verdict.gates:
        gates.add_metric([gate.name], OUTCOME_VALUE.get(gate.outcome, 0.5))
    overall = GaugeMetricFamily("shadow_proxy_verdict", "Latest stored overall verdict (same values).")
    overall.add_metric([], OUTCOME_VALUE.get(report.verdict.outcome, 0.5))
    per_candidate = GaugeMetricFamily(
        "shadow_proxy_verdict_candidate", "Latest stored verdict of each candidate (same values).", labels=["candidate"]
    )
    for item in report.candidates:
        per_candidate.add_metric([item.name], OUTCOME_VALUE.get(item.verdict, 0.5))
    return [gates, overall, per_candidate]


def registry_for_scrape(metrics: Metrics, snapshot: list[Metric]) -> CollectorRegistry:
    """A registry for one scrape: every worker's metrics in multiprocess mode, else this process's."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(metrics.registry))
    registry.register(_Snapshot(snapshot))
    return registry

"""Prometheus metrics of one proxy process; every drop and failure has a counter with its reason."""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

_Metric = TypeVar("_Metric", bound=MetricWrapperBase)

# The *_created series double every counter's output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The proxy's counters, on a registry of its own (one per app, so tests can read exact values)."""

    def __init__(self) -> None:
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "shadow_proxy_requests",
            "Live requests answered, by serving upstream, route and status code.",
            ["upstream", "route", "code"],
            registry=r,
        )
        self.upstream_pool_waits = Counter(
            "shadow_proxy_upstream_pool_waits",
            "Upstream requests that waited for a connection because the upstream's pool was at pool_size.",
            ["upstream"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "shadow_proxy_upstream_errors",
            "Upstream failures by upstream, role (live/shadow) and error class.",
            ["upstream", "role", "error"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "shadow_proxy_upstream_duration_seconds",
            "Time from sending a request upstream to its last byte.",
            ["upstream", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "shadow_proxy_overhead_seconds",
            "Time the proxy spends on a request before sending it upstream (body read, routing, headers).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0),
            registry=r,
        )
        self.rejected = Counter(
            "shadow_proxy_requests_rejected",
            "Requests refused by the proxy itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.connections_closed = Counter(
            "shadow_proxy_connections_closed",
            "Client connections the proxy closed itself, by reason (max_connections, header_timeout, idle_timeout).",
            ["reason"],
            registry=r,
        )
        self.client_connections = Gauge(
            "shadow_proxy_client_connections",
            "Client connections open on the main listener now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.client_disconnects = Counter(
            "shadow_proxy_client_disconnects",
            "Clients that went away before their response was complete.",
            registry=r,
        )
        self.mirrors_sent = Counter(
            "shadow_proxy_mirrors_sent",
            "Mirrored requests started, by target (a candidate's name, incumbent, incumbent_noise).",
            ["target"],
            registry=r,
        )
        self.mirrors_skipped = Counter(
            "shadow_proxy_mirrors_skipped",
            "Requests not mirrored, by target (a candidate's name, incumbent, incumbent_noise) and reason.",
            ["target", "reason"],
            registry=r,
        )
        self.mirrors_failed = Counter(
            "shadow_proxy_mirrors_failed",
            "Mirrors that ended in an error, by target and error class.",
            ["target", "error"],
            registry=r,
        )
        self.mirrors_slow = Counter(
            "shadow_proxy_mirrors_slow",
            "Mirrors with no response headers after the slow threshold (a breaker failure), by target.",
            ["target"],
            registry=r,
        )
        self.mirror_ejections = Counter(
            "shadow_proxy_mirror_ejections",
            "Times the mirror breaker ejected a target (opened, or reopened after a failed probe).",
            ["target"],
            registry=r,
        )
        self.mirror_breaker_state = Gauge(
            "shadow_proxy_mirror_breaker_state",
            "Mirror breaker state by target: 0 closed, 1 open (ejected), 2 half-open (a probe is out).",
            ["target"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.mirror_slow_after = Gauge(
            "shadow_proxy_mirror_slow_after_seconds",
            "Seconds without response headers after which a mirror counts as slow, by target (learned or slow_after).",
            ["target"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.mirror_spend = Counter(
            "shadow_proxy_mirror_spend",
            "Cost of finished mirrors, by target (price table or price list x usage), for spend budgets.",
            ["target"],
            registry=r,
        )
        self.mirror_spend_unpriced = Counter(
            "shadow_proxy_mirror_spend_unpriced",
            "Finished mirrors of a budgeted target whose model has no known price (their cost counts as 0).",
            ["target"],
            registry=r,
        )
        self.mirrors_in_flight = Gauge(
            "shadow_proxy_mirrors_in_flight",
            "Mirrors running now, by target.",
            ["target"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.records_queued = Counter(
            "shadow_proxy_records_queued", "Records accepted into the write queue.", registry=r
        )
        self.records_written = Counter("shadow_proxy_records_written", "Records written to Redis.", registry=r)
        self.records_dropped = Counter(
            "shadow_proxy_records_dropped",
            "Records dropped, by reason.",
            ["reason"],
            registry=r,
        )
        self.record_write_errors = Counter(
            "shadow_proxy_record_write_errors",
            "Failed batch writes to Redis (the batch is retried).",
            registry=r,
        )
        self.record_queue_depth = Gauge(
            "shadow_proxy_record_queue_depth", "Records waiting to be written.", registry=r, multiprocess_mode="livesum"
        )
        self.canary_weight = Gauge(
            "shadow_proxy_canary_weight",
            "Share of users the candidate serves (0..1), as this process sees it.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.canary_stage = Gauge(
            "shadow_proxy_canary_stage", "Current canary stage index.", registry=r, multiprocess_mode="livemax"
        )
        self.feedback = Counter(
            "shadow_proxy_feedback",
            "User feedback received, by serving arm and result.",
            ["arm", "result"],
            registry=r,
        )
        self.record_queue_bytes = Gauge(
            "shadow_proxy_record_queue_bytes", "Bytes held by records waiting.", registry=r, multiprocess_mode="livesum"
        )
        self.bodies_withheld = Counter(
            "shadow_proxy_record_bodies_withheld",
            "Recorded bodies replaced whole because they could not be checked for secrets, by reason.",
            ["reason"],
            registry=r,
        )
        # Background loops (recorder, spend sync, canary weights and controller) and their supervisor.
        self.loop_up = Gauge(
            "shadow_proxy_loop_up",
            "1 while a background loop works, 0 while it is failing (Redis unavailable) or restarting.",
            ["loop"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.loop_restarts = Counter(
            "shadow_proxy_loop_restarts",
            "Background loops restarted by the supervisor after an unexpected error, by loop.",
            ["loop"],
            registry=r,
        )
        # The disk spool (record.spool_dir): records written to disk before Redis.
        self.spool_records = Gauge(
            "shadow_proxy_spool_records",
            "Records in the disk spool not yet written to Redis.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_bytes = Gauge(
            "shadow_proxy_spool_bytes", "Bytes the disk spool holds on disk.", registry=r, multiprocess_mode="livesum"
        )
        self.spool_recovered = Counter(
            "shadow_proxy_spool_recovered",
            "Records found in the spool at startup (left by an earlier process) and replayed.",
            registry=r,
        )

    def child(self, metric: _Metric, *labels: str) -> _Metric:
        """``metric.labels(*labels)``, looked up once: ``labels()`` validates and locks on every call (a few us),
        a dict hit costs a tenth of that. Label values come from the config and status codes, so this stays small."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when absent): for tests and the readiness report."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

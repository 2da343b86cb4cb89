"""The objects one proxy process runs with, built once from the config (no I/O in constructors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .canary.controller import Controller
from .canary.store import CanaryStore
from .canary.weights import WeightWatcher
from .comparator.offload import ReportBuilder
from .config import Config, ConfigError
from .forwarding import CanaryRouting, Forwarder, ServingArm
from .metrics import Metrics
from .recorder import Recorder
from .routing import MirrorPolicy, RouteTable
from .shadow import ShadowDispatcher
from .store import Keys, RecordStore
from .upstream import Upstream


@dataclass(slots=True)
class Canary:
    """The canary parts of a proxy process (present whenever records go to Redis)."""

    store: CanaryStore
    controller: Controller
    weights: WeightWatcher | None  # None unless canary.enabled
    live_candidate: Upstream | None
    reverse: ShadowDispatcher | None


@dataclass(slots=True)
class Runtime:
    """Shared by the main listener, the admin listener and the lifecycle contexts."""

    config: Config
    metrics: Metrics
    incumbent: Upstream
    candidate: Upstream | None
    store: RecordStore | None
    recorder: Recorder | None
    shadow: ShadowDispatcher | None
    noise: ShadowDispatcher | None
    canary: Canary | None
    forwarder: Forwarder
    shutting_down: bool = False
    upstreams: list[Upstream] = field(default_factory=list)
    # Reports and canary evidence are built in a child process, never on this event loop.
    reports: ReportBuilder = field(default_factory=lambda: ReportBuilder(offload=True))

    def dispatchers(self) -> list[ShadowDispatcher]:
        reverse = self.canary.reverse if self.canary is not None else None
        return [d for d in (self.shadow, self.noise, reverse) if d is not None]

    @classmethod
    def build(cls, config: Config) -> Runtime:
        metrics = Metrics()
        record = config.record
        incumbent = Upstream("incumbent", config.incumbent)
        candidate = Upstream("candidate", config.candidate) if config.candidate.url else None
        cap = record.max_body_bytes if record.enabled else 0  # nothing is captured when nothing is recorded
        keys = Keys(record.namespace, record.stream)
        store = recorder = canary = None
        if record.enabled:
            store = RecordStore(
                record.redis_url,
                keys,
                maxlen=record.maxlen,
                socket_timeout=record.socket_timeout,
                # Who served each request is kept (one key per request) only while feedback can use it.
                served_ttl=config.canary.feedback_ttl if feedback_enabled(config) else 0,
            )
            recorder = Recorder(store, record, metrics)
            reports = ReportBuilder(offload=True)
            canary = _canary(config, keys, metrics, cap, candidate, reports)
        elif config.canary.enabled:
            raise ConfigError("canary.enabled = true needs Redis: set record.enabled = true (the weight lives there)")
        shadow = ShadowDispatcher(candidate, config.shadow, metrics, capture_cap=cap) if candidate else None
        noise = None
        if config.compare.noise_sample_rate > 0 and record.enabled:
            noise = _incumbent_mirror(config, metrics, cap, target="incumbent_noise", role="noise")
        routes = RouteTable.compile(config.shadow.routes)
        routing = candidate_live = None
        if canary is not None and canary.weights is not None and canary.live_candidate is not None:
            routing = CanaryRouting(canary.weights, config.canary.sticky_keys, config.canary.served_by_header)
            candidate_live = ServingArm(canary.live_candidate, canary.reverse)
        forwarder = Forwarder(
            incumbent=incumbent,
            shadow=shadow,
            candidate_live=candidate_live,
            canary=routing,
            noise=noise,
            noise_sample_rate=config.compare.noise_sample_rate,
            recorder=recorder,
            metrics=metrics,
            policy=MirrorPolicy(
                routes=routes,
                methods=frozenset(config.shadow.methods),
                sample_rate=config.shadow.sample_rate,
                max_body_bytes=config.shadow.max_body_bytes,
            ),
            routes=routes,
            request_id_header=config.proxy.request_id_header,
            via=config.proxy.via,
            max_body_bytes=config.limits.max_body_bytes,
            record_cap=cap,
        )
        runtime = cls(config, metrics, incumbent, candidate, store, recorder, shadow, noise, canary, forwarder)
        if canary is not None:
            runtime.reports = canary.controller.builder
        runtime.upstreams = [incumbent, *(u for u in (candidate,) if u is not None)]
        runtime.upstreams += [d.upstream for d in runtime.dispatchers() if d.upstream not in runtime.upstreams]
        if canary is not None and canary.live_candidate is not None:
            runtime.upstreams.append(canary.live_candidate)
        return runtime


def feedback_enabled(config: Config) -> bool:
    """Feedback compares arms only while a canary can serve users from the candidate."""
    return config.canary.enabled and bool(config.canary.feedback_path) and config.record.enabled


def _canary(
    config: Config, keys: Keys, metrics: Metrics, cap: int, candidate: Upstream | None, reports: ReportBuilder
) -> Canary:
    record = config.record
    store = CanaryStore(record.redis_url, keys, socket_timeout=record.socket_timeout)
    controller = Controller(config, record.redis_url, builder=reports)
    if not config.canary.enabled or candidate is None:
        return Canary(store, controller, None, None, None)
    weights = WeightWatcher(store, metrics, poll_interval=config.canary.weight_poll_interval)
    # The candidate serving live traffic gets a pool of its own, apart from the mirrors' pool.
    live_candidate = Upstream("candidate", config.candidate)
    reverse = None
    if config.canary.reverse_shadow:
        reverse = _incumbent_mirror(config, metrics, cap, target="incumbent", role="shadow")
    return Canary(store, controller, weights, live_candidate, reverse)


def _incumbent_mirror(config: Config, metrics: Metrics, cap: int, *, target: str, role: str) -> ShadowDispatcher:
    """Mirrors to the incumbent (A/A copies, reverse shadow) on a client of their own: never the live pool."""
    return ShadowDispatcher(
        Upstream("incumbent", config.incumbent), config.shadow, metrics, capture_cap=cap, target=target, role=role
    )

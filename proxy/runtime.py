"""The objects one proxy process runs with, built once from the config (no I/O in constructors)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .forwarding import Forwarder
from .metrics import Metrics
from .recorder import Recorder
from .routing import MirrorPolicy, RouteTable
from .shadow import ShadowDispatcher
from .store import Keys, RecordStore
from .upstream import Upstream


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
    forwarder: Forwarder
    shutting_down: bool = False

    @classmethod
    def build(cls, config: Config) -> Runtime:
        metrics = Metrics()
        incumbent = Upstream("incumbent", config.incumbent)
        candidate = Upstream("candidate", config.candidate) if config.candidate.url else None
        store = recorder = None
        if config.record.enabled:
            keys = Keys(config.record.namespace, config.record.stream)
            store = RecordStore(
                config.record.redis_url, keys, maxlen=config.record.maxlen, socket_timeout=config.record.socket_timeout
            )
            recorder = Recorder(store, config.record, metrics)
        shadow = noise = None
        cap = config.record.max_body_bytes if config.record.enabled else 0
        if candidate is not None:
            shadow = ShadowDispatcher(candidate, config.shadow, metrics, capture_cap=cap)
        if config.compare.noise_sample_rate > 0 and config.record.enabled:
            # A second client of the incumbent, so A/A copies never take live connections.
            noise_upstream = Upstream("incumbent", config.incumbent)
            noise = ShadowDispatcher(
                noise_upstream, config.shadow, metrics, capture_cap=cap, target="incumbent_noise", role="noise"
            )
        routes = RouteTable.compile(config.shadow.routes)
        forwarder = Forwarder(
            incumbent=incumbent,
            shadow=shadow,
            noise=noise,
            noise_sample_rate=config.compare.noise_sample_rate,
            recorder=recorder,
            metrics=metrics,
            policy=MirrorPolicy(
                enabled=candidate is not None,
                routes=routes,
                methods=frozenset(config.shadow.methods),
                sample_rate=config.shadow.sample_rate,
                max_body_bytes=config.shadow.max_body_bytes,
            ),
            routes=routes,
            request_id_header=config.proxy.request_id_header,
            via=config.proxy.via,
            max_body_bytes=config.limits.max_body_bytes,
            # Nothing is captured when nothing is recorded.
            record_cap=config.record.max_body_bytes if config.record.enabled else 0,
        )
        return cls(config, metrics, incumbent, candidate, store, recorder, shadow, noise, forwarder)

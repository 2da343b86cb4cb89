"""The objects one proxy process runs with, built once from the config (no I/O in constructors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .budget import BUDGET_CAPTURE, MirrorCost, SpendLedger, SpendSync
from .canary.controller import Controller
from .canary.tokens import FeedbackTokens, with_feedback_secret
from .canary.weights import WeightWatcher
from .comparator.offload import ReportBuilder
from .config import CandidateConfig, Config, ConfigError, canary_candidate
from .forwarding import CanaryRouting, Forwarder, ServingArm
from .isolation.link import ShadowLink, Targets
from .metrics import Metrics
from .recorder import Recorder
from .redis import CanaryStore, Clients, Keys, RecordWriter
from .routing import MirrorPolicy, RouteTable
from .shadow import ShadowDispatcher
from .supervisor import Health, Supervisor
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
    candidates: list[Upstream]
    clients: Clients | None  # the process's Redis clients, one per role (None when nothing is recorded)
    writer: RecordWriter | None
    recorder: Recorder | None
    shadows: tuple[ShadowDispatcher, ...]
    noise: ShadowDispatcher | None
    canary: Canary | None
    forwarder: Forwarder
    spend: SpendSync | None = None
    supervisor: Supervisor = field(default_factory=Supervisor)
    shutting_down: bool = False
    upstreams: list[Upstream] = field(default_factory=list)
    # Reports and canary evidence are built in a child process, never on this event loop.
    reports: ReportBuilder = field(default_factory=lambda: ReportBuilder(offload=True))
    link: ShadowLink | None = None  # with shadow.isolation = "process": the shadow process and its socket

    def dispatchers(self) -> list[ShadowDispatcher]:
        reverse = self.canary.reverse if self.canary is not None else None
        return [d for d in (*self.shadows, self.noise, reverse) if d is not None]

    @classmethod
    def build(cls, config: Config) -> Runtime:
        metrics = Metrics()
        supervisor = _supervisor(metrics)
        record = config.record
        incumbent = Upstream("incumbent", config.incumbent, metrics)
        cap = record.max_body_bytes if record.enabled else 0  # nothing is captured when nothing is recorded
        keys = Keys(record.namespace, record.stream, record.shards)
        clients = writer = recorder = canary = None
        # In process mode this process only serves: mirrors and the recorder live in its shadow process.
        isolated = config.shadow.isolation == "process"
        if record.enabled:
            clients = Clients(record.redis_url, socket_timeout=record.socket_timeout)
            writer = RecordWriter(
                clients.get("records"),
                keys,
                maxlen=record.maxlen,
                # Who served each request is kept (one key per request) only while feedback can use it.
                served_ttl=config.canary.feedback_ttl if feedback_enabled(config) else 0,
            )
            if not isolated:
                recorder = Recorder(writer, record, metrics, health=supervisor.health("recorder"))
            reports = ReportBuilder(offload=True)
            canary = _canary(config, clients, keys, metrics, cap, reports, supervisor)
            if isolated:
                canary.reverse = None
        elif config.canary.enabled:
            raise ConfigError("canary.enabled = true needs Redis: set record.enabled = true (the weight lives there)")
        shadows = () if isolated else tuple(_candidate_mirror(config, c, metrics, cap) for c in config.candidate)
        noise = None
        if config.compare.noise_sample_rate > 0 and record.enabled and not isolated:
            rate = config.compare.noise_sample_rate
            noise = _incumbent_mirror(config, metrics, cap, target="incumbent_noise", role="noise", sample_rate=rate)
        routing = candidate_live = None
        if canary is not None and canary.weights is not None and canary.live_candidate is not None:
            routing = CanaryRouting(canary.weights, config.canary.sticky_keys, config.canary.served_by_header)
            # While the candidate serves, the incumbent is mirrored instead, and the other candidates still are.
            others = tuple(s for s in shadows if s.upstream.name != canary.live_candidate.name)
            reverse = (canary.reverse,) if canary.reverse is not None else ()
            candidate_live = ServingArm(canary.live_candidate, reverse + others)
        link = None
        if isolated:
            link = ShadowLink(config, metrics, mirror_targets(config), supervisor.health("shadow-process"))
        forwarder = Forwarder(
            incumbent=ServingArm(incumbent, shadows),
            candidate_live=candidate_live,
            canary=routing,
            noise=noise,
            recorder=recorder,
            metrics=metrics,
            routes=RouteTable.compile(config.shadow.routes),
            request_id_header=config.proxy.request_id_header,
            via=config.proxy.via,
            max_body_bytes=config.limits.max_body_bytes,
            record_cap=cap,
            feedback_tokens=_feedback_tokens(config),
            link=link,
        )
        # In process mode these serve /readyz's probes only; the mirrors' own pools are the shadow process's.
        candidates = [Upstream(c.name, c) for c in config.candidate] if isolated else [s.upstream for s in shadows]
        runtime = cls(
            config, metrics, incumbent, candidates, clients, writer, recorder, shadows, noise, canary, forwarder
        )
        runtime.supervisor = supervisor
        runtime.link = link
        ledgers = {s.upstream.name: s.ledger for s in shadows if s.ledger is not None}
        if writer is not None and ledgers:
            runtime.spend = SpendSync(writer, ledgers, health=supervisor.health("spend-sync"))
        if canary is not None:
            runtime.reports = canary.controller.builder
        runtime.upstreams = [incumbent, *candidates]
        runtime.upstreams += [d.upstream for d in runtime.dispatchers() if d.upstream not in runtime.upstreams]
        if canary is not None and canary.live_candidate is not None:
            runtime.upstreams.append(canary.live_candidate)
        return runtime


def feedback_enabled(config: Config) -> bool:
    """Feedback compares arms only while a canary can serve users from the candidate."""
    return config.canary.enabled and bool(config.canary.feedback_path) and config.record.enabled


def _feedback_tokens(config: Config) -> FeedbackTokens | None:
    """`serve` draws a missing secret before spawning workers; an in-process server draws its own."""
    if not feedback_enabled(config):
        return None
    return FeedbackTokens(with_feedback_secret(config).canary.feedback_secret.get_secret_value())


def _supervisor(metrics: Metrics) -> Supervisor:
    """The process's loop supervisor, mirrored into ``shadow_proxy_loop_up`` and ``..._loop_restarts_total``."""

    def changed(health: Health) -> None:
        metrics.loop_up.labels(health.name).set(1.0 if health.ok else 0.0)

    supervisor = Supervisor(changed)
    supervisor.restarted = lambda name: metrics.loop_restarts.labels(name).inc()
    return supervisor


def _canary(
    config: Config,
    clients: Clients,
    keys: Keys,
    metrics: Metrics,
    cap: int,
    reports: ReportBuilder,
    supervisor: Supervisor,
) -> Canary:
    store = CanaryStore(clients.get("control"), keys)
    controller = Controller(config, clients, builder=reports)
    candidate = canary_candidate(config)
    if not config.canary.enabled or candidate is None:
        return Canary(store, controller, None, None, None)
    weights = WeightWatcher(
        store,
        metrics,
        poll_interval=config.canary.weight_poll_interval,
        health=supervisor.health("canary-weights"),
    )
    # The candidate serving live traffic gets a pool of its own, apart from the mirrors' pool.
    live_candidate = Upstream(candidate.name, candidate, metrics)
    reverse = None
    if config.canary.reverse_shadow:
        # The incumbent is mirrored on the requests the candidate itself would have been mirrored.
        rate = candidate.sample_rate if candidate.sample_rate is not None else config.shadow.sample_rate
        reverse = _incumbent_mirror(
            config, metrics, cap, target="incumbent", role="shadow", sample_rate=rate, routes=candidate.routes
        )
    return Canary(store, controller, weights, live_candidate, reverse)


def mirror_targets(config: Config) -> Targets:
    """The mirror targets of each serving upstream with their pure sampling policies: what a request would
    have been mirrored to, counted as skipped (``shadow_down``) when the shadow process cannot take it."""
    candidates = [(c.name, _policy(config, routes=c.routes, sample_rate=_rate(config, c))) for c in config.candidate]
    noise = []
    if config.compare.noise_sample_rate > 0 and config.record.enabled:
        noise = [("incumbent_noise", _policy(config, sample_rate=config.compare.noise_sample_rate))]
    targets = {"incumbent": (*candidates, *noise)}
    live = canary_candidate(config)
    if config.canary.enabled and config.record.enabled and live is not None:
        reverse = []
        if config.canary.reverse_shadow:
            reverse = [("incumbent", _policy(config, routes=live.routes, sample_rate=_rate(config, live)))]
        targets[live.name] = (*reverse, *(c for c in candidates if c[0] != live.name), *noise)
    return targets


def _rate(config: Config, candidate: CandidateConfig) -> float:
    return candidate.sample_rate if candidate.sample_rate is not None else config.shadow.sample_rate


def _policy(config: Config, *, routes: tuple[str, ...] | None = None, sample_rate: float) -> MirrorPolicy:
    shadow = config.shadow
    return MirrorPolicy(
        routes=RouteTable.compile(routes if routes is not None else shadow.routes),
        methods=frozenset(shadow.methods),
        sample_rate=sample_rate,
        max_body_bytes=shadow.max_body_bytes,
    )


def _candidate_mirror(config: Config, candidate: CandidateConfig, metrics: Metrics, cap: int) -> ShadowDispatcher:
    """Mirrors to one candidate: its own pool, routes, sample rate, in-flight cap and spend budget."""
    rate = candidate.sample_rate if candidate.sample_rate is not None else config.shadow.sample_rate
    ledger = cost = None
    if candidate.budget_per_hour > 0:
        ledger, cost = SpendLedger(candidate.budget_per_hour), MirrorCost(candidate)
        cap = max(cap, BUDGET_CAPTURE)  # the answer is needed to count its cost, recorded or not
    return ShadowDispatcher(
        Upstream(candidate.name, candidate, metrics),
        config.shadow,
        metrics,
        capture_cap=cap,
        policy=_policy(config, routes=candidate.routes, sample_rate=rate),
        max_in_flight=candidate.max_in_flight,
        slow_after=candidate.slow_after,
        target=candidate.name,
        ledger=ledger,
        cost_of=cost,
    )


def check_budgets(config: Config) -> None:
    """A budget needs prices: refuse a candidate whose fixed model name neither its table nor the price list
    knows (a model map or a passed-through name can only be checked per answer: counted as unpriced)."""
    for index, candidate in enumerate(config.candidate):
        model = candidate.model
        if candidate.budget_per_hour > 0 and isinstance(model, str) and model and MirrorCost(candidate).unpriced(model):
            raise ConfigError(
                f"invalid config key candidate.{index}.budget_per_hour = {candidate.budget_per_hour}: no price is "
                f"known for model {model!r}, so its spend cannot be counted: set [candidate.price] for it"
            )


def _incumbent_mirror(
    config: Config,
    metrics: Metrics,
    cap: int,
    *,
    target: str,
    role: str,
    sample_rate: float,
    routes: tuple[str, ...] | None = None,
) -> ShadowDispatcher:
    """Mirrors to the incumbent (A/A copies, reverse shadow) on a client of their own: never the live pool."""
    return ShadowDispatcher(
        Upstream("incumbent", config.incumbent, metrics),
        config.shadow,
        metrics,
        capture_cap=cap,
        policy=_policy(config, routes=routes, sample_rate=sample_rate),
        target=target,
        role=role,
    )

"""The canary controller: exactly one process at a time (a Redis lease) evaluates the current stage.

Each turn the lease holder reads the state, builds the comparator's verdict over the current stage's
own window (windows starting at or after the stage began), adds the satisfaction gate from user
feedback when the stage asks for it, and commits the pure transition with a version compare-and-set.
A controller restarted mid-stage resumes from the stored state: the stage start is in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from typing import Any

import structlog

from ..comparator import monitoring, sequential
from ..comparator.aggregate import merge, similarity_histogram
from ..comparator.offload import INLINE, ReportBuilder
from ..comparator.report import Monitor, candidate_of
from ..config import Config, canary_candidate, parse_duration
from ..redis import AggregateReader, Backoff, CanaryStore, Clients, Keys, StoreUnavailable
from ..supervisor import Health
from .state import ACTIVE, CanaryState, Policy, Stage, Transition, evaluate, initial, manual

log = structlog.get_logger("shadow_proxy.canary")


def policy_from(config: Config) -> Policy:
    stages = tuple(Stage(s.weight, s.min_duration, s.min_pairs, s.gates) for s in config.canary.stage)
    return Policy(stages, config.canary.on_fail)


class Controller:
    """Reads evidence, decides and commits; also the one entry point for operators' actions."""

    def __init__(
        self, config: Config, redis: str | Clients, *, holder: str | None = None, builder: ReportBuilder = INLINE
    ) -> None:
        """``redis`` is a URL (this controller then owns its client) or the process's shared clients."""
        keys = Keys(config.record.namespace, config.record.stream, config.record.shards)
        self.config = config
        self.policy = policy_from(config)
        self._own = isinstance(redis, str)
        self._clients = Clients(redis, socket_timeout=config.record.socket_timeout) if isinstance(redis, str) else redis
        client = self._clients.get("control")
        self.store = CanaryStore(client, keys)
        self.reader = AggregateReader(client, keys)
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # Every gate of every stage shares one error budget: a whole canary errs either way with
        # probability at most 1 - confidence, however often the controller looks (docs/sequential.md).
        stages = config.canary.stage
        gates = max(len(stage.gates) for stage in stages)
        self.plan = sequential.split_alpha(1.0 - config.compare.gates.confidence, gates, len(stages))
        self.last_evidence: dict[str, Any] | None = None
        self.builder = builder

    async def close(self) -> None:
        if self._own:
            await self._clients.close()

    async def current(self, now: float | None = None) -> CanaryState:
        """The stored state, created at the first stage if there is none yet."""
        state = await self.store.state()
        if state is None:
            await self.store.create(initial(self.policy, time.time() if now is None else now))
            state = await self.store.state()
        assert state is not None
        return state

    async def evidence(self, state: CanaryState, now: float) -> tuple[dict[str, str], int, dict[str, Any]]:
        """Gate outcomes and pairs over the current stage's window only."""
        compare = self.config.compare
        windows = await self.reader.load(state.stage_started, now, compare.examples_per_window)
        candidate = canary_candidate(self.config)
        name = candidate.name if candidate is not None else None
        segments = await self.reader.segments()
        monitor = Monitor(self.plan, reference=await self._noise_before(state.stage_started, segments, name))
        report = await self.builder.build(
            windows, segments, compare, since=state.stage_started, until=now, candidate=name, monitor=monitor
        )
        gates = {g.name: g.model_dump(mode="json") for g in report.verdict.gates}
        gates["satisfaction"] = (await self._satisfaction(state, now)).as_dict()
        pairs = report.summary.pairs
        evidence = {
            "pairs": pairs,
            "window": [state.stage_started, now],
            "method": sequential.METHOD,
            "alpha_plan": self.plan.describe(),
            "gates": {
                name: {
                    k: g.get(k)
                    for k in ("outcome", "estimate", "interval", "threshold", "n", "rule", "need_more_pairs", "method")
                }
                for name, g in gates.items()
            },
        }
        return {name: g["outcome"] for name, g in gates.items()}, pairs, evidence

    async def _satisfaction(self, state: CanaryState, now: float) -> Any:
        feedback = await self.reader.feedback(state.stage_started, now, self.config.compare.window_seconds)
        canary = self.config.canary
        return monitoring.satisfaction_gate(
            feedback,
            self.config.compare.gates,
            self.plan,
            sequential.DEFAULT_T_STAR,
            min_feedback=canary.min_feedback,
            drop_max=canary.satisfaction_drop_max,
        )

    async def _noise_before(self, start: float, segments: dict[str, Any], candidate: str | None) -> dict[int, float]:
        """The incumbent's A/A similarity over the report range before the stage: the stage's frozen threshold."""
        since = start - parse_duration(self.config.compare.report_since)
        windows = await self.reader.load(since, start - self.config.compare.window_seconds, 0)
        mine = [w for w in windows if candidate is None or candidate_of(segments.get(w.segment, {})) == candidate]
        return similarity_histogram(merge(w.counters for w in mine), "aa")

    async def step(self, now: float | None = None) -> Transition | None:
        """One evaluation of the current stage; the committed transition, if any."""
        now = time.time() if now is None else now
        state = await self.current(now)
        if state.status != ACTIVE:
            return None
        outcomes, pairs, evidence = await self.evidence(state, now)
        self.last_evidence = evidence
        transition = evaluate(state, self.policy, outcomes, pairs, now, evidence)
        if transition is None:
            return None
        if not await self.store.commit(transition):
            log.info("canary_commit_lost", version=state.version)
            return None
        log.warning(
            "canary_transition",
            action=transition.action,
            reason=transition.reason,
            weight=transition.after.weight,
            stage=transition.after.stage,
        )
        return transition

    async def act(self, action: str, *, actor: str, reason: str, weight: float | None = None) -> Transition:
        """An operator's action, retried if the state changed underneath; ValueError when not allowed."""
        for _ in range(5):
            state = await self.current()
            transition = manual(state, self.policy, action, time.time(), actor=actor, reason=reason, weight=weight)
            if await self.store.commit(transition):
                log.warning(
                    "canary_manual_action", action=action, actor=actor, reason=reason, weight=transition.after.weight
                )
                return transition
        raise StoreUnavailable("the canary state kept changing; try again")

    async def run(self, stop: asyncio.Event, health: Health | None = None) -> None:
        """Hold the lease and evaluate every canary.evaluate_interval until stopped.

        Redis trouble (a restart, a failover, a timeout, BUSY or LOADING) is reported on ``health`` and
        retried with backoff; the lease lapses meanwhile, so another replica can take over.
        """
        health = health or Health("canary-controller")
        canary = self.config.canary
        ttl_ms = int(canary.lease_ttl * 1000)
        holding = False
        backoff = Backoff(0.2, min(canary.evaluate_interval, canary.lease_ttl / 3))
        try:
            while not stop.is_set():
                wait = min(canary.evaluate_interval, canary.lease_ttl / 3)
                try:
                    leader = await self.store.hold_lease(self.holder, ttl_ms)
                    if leader != holding:
                        log.info("canary_lease", holder=self.holder, held=leader)
                        holding = leader
                    if leader:
                        await self.step()
                    health.up()
                    backoff.reset()
                except StoreUnavailable as exc:
                    if health.ok:
                        log.warning("canary_redis_unavailable", error=str(exc))
                    health.down(f"redis {exc.kind}")
                    holding = False
                    wait = backoff.next()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            with contextlib.suppress(StoreUnavailable):
                await self.store.release_lease(self.holder)

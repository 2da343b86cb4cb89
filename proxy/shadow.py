"""The owned, bounded set of mirror tasks: never awaited by a request handler, drained at shutdown.

A mirror is its own task, not the handler's: a client disconnect does not cancel it, and a slow
or failing candidate only ever costs a slot in this set. When the set is full the mirror is
dropped and counted, never queued behind the live path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from .breaker import Breaker
from .budget import SpendLedger
from .config import ShadowConfig
from .exchange import ArmCapture, Exchange, now
from .metrics import Metrics
from .routing import MirrorPolicy
from .upstream import Upstream

CostOf = Callable[[ArmCapture, bytes], float | None]
# Costing a larger answer (parse, tokenizer) runs in a thread rather than between live requests.
COST_INLINE_BYTES = 32 * 1024

log = structlog.get_logger("shadow_proxy.shadow")


class ShadowDispatcher:
    """Runs mirrors to one upstream, at most ``max_in_flight`` at a time.

    ``policy`` decides which requests this target wants (its routes, sample rate); ``ledger`` and
    ``cost_of`` (both or neither) hold a candidate to its spend budget.
    """

    def __init__(
        self,
        upstream: Upstream,
        config: ShadowConfig,
        metrics: Metrics,
        *,
        capture_cap: int,
        policy: MirrorPolicy,
        max_in_flight: int | None = None,
        target: str = "candidate",
        role: str = "shadow",
        ledger: SpendLedger | None = None,
        cost_of: CostOf | None = None,
    ) -> None:
        self.upstream = upstream
        self.target = target
        self.role = role
        self.policy = policy
        self.ledger = ledger
        self._cost_of = cost_of
        self._config = config
        self._max_in_flight = max_in_flight or config.max_in_flight
        self._metrics = metrics
        self._cap = capture_cap
        self._tasks: set[asyncio.Task[None]] = set()
        self._breaker = Breaker(config.breaker_failures, config.breaker_cooldown) if config.breaker_failures else None
        self._gauge = metrics.mirrors_in_flight.labels(target)
        self._warned_unpriced = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def skip_reason(self, exchange: Exchange) -> str | None:
        """Why this exchange gets no mirror from this target (a metric label), or None to mirror it."""
        reason = self.policy.skip_reason(
            method=exchange.method, path=exchange.path, request_id=exchange.request_id, body_size=len(exchange.body)
        )
        if reason is not None:
            return reason
        if len(self._tasks) >= self._max_in_flight:
            return "full"
        if self.ledger is not None and self.ledger.exhausted(time.time()):
            return "budget"
        # Last: allow() may hand out the breaker's one probe, which must then really be sent.
        if self._breaker is not None and not self._breaker.allow(now()):
            return "target_down"
        return None

    def dispatch(self, exchange: Exchange, raw_path_qs: str, headers: list[tuple[str, str]]) -> ArmCapture | None:
        """Start a mirror of the exchange's request; None (skipped, counted and noted in the exchange)
        when this target does not want it, its set is full, it refuses connections or its budget is spent."""
        reason = self.skip_reason(exchange)
        if reason is not None:
            self._metrics.mirrors_skipped.labels(self.target, reason).inc()
            if self.role == "shadow":
                exchange.shadow_skipped[self.upstream.name] = reason
            return None
        arm = ArmCapture(self.upstream.name, self.role, self._cap, start=now())
        if self.ledger is not None:
            arm.tail = bytearray()
        exchange.expect_arm()
        headers = [*headers, (self._config.marker_header, self._config.marker_value)]
        task = asyncio.create_task(self._mirror(exchange, arm, raw_path_qs, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._metrics.mirrors_sent.labels(self.target).inc()
        self._gauge.inc()
        return arm

    async def _mirror(
        self, exchange: Exchange, arm: ArmCapture, raw_path_qs: str, headers: list[tuple[str, str]]
    ) -> None:
        try:
            # Shaped here, in the mirror's own task: the live path never pays for another arm's rewrite.
            shaped = self.upstream.shaping.apply(exchange.body, headers)
            arm.model = shaped.model
            failure = await self.upstream.capture(arm, exchange.method, raw_path_qs, shaped.headers, shaped.body)
            if failure is not None:
                self._metrics.mirrors_failed.labels(self.target, failure.error).inc()
                self._metrics.upstream_errors.labels(self.upstream.name, arm.role, failure.error).inc()
                log.debug("mirror_failed", error=failure.error, detail=failure.detail)
            self._account_breaker(failure.error if failure is not None else None)
            # Billed: answered, even when the stream was cut short; refused (4xx/5xx) calls are not.
            if self.ledger is not None and self._cost_of is not None and arm.status is not None and arm.status < 400:
                await self._charge(self.ledger, self._cost_of, arm, shaped.body)
        except asyncio.CancelledError:
            arm.finish(now(), "cancelled_at_shutdown")
            self._metrics.mirrors_failed.labels(self.target, "cancelled_at_shutdown").inc()
            raise
        finally:
            if arm.end is not None and arm.error is None:
                self._metrics.upstream_latency.labels(self.upstream.name, arm.role).observe(arm.end - arm.start)
            self._gauge.dec()
            exchange.arm_done()

    async def _charge(self, ledger: SpendLedger, cost_of: CostOf, arm: ArmCapture, body: bytes) -> None:
        """Add a finished mirror's cost to its candidate's spend (an answer cut short is billed too)."""
        if arm.captured + len(body) > COST_INLINE_BYTES:
            amount = await asyncio.to_thread(cost_of, arm, body)
        else:
            amount = cost_of(arm, body)
        if amount is None:
            self._metrics.mirror_spend_unpriced.labels(self.target).inc()
            if not self._warned_unpriced:
                self._warned_unpriced = True
                log.warning("mirror_spend_unpriced", target=self.target, model=arm.model)
            return
        ledger.add(amount, time.time())
        self._metrics.mirror_spend.labels(self.target).inc(amount)

    def _account_breaker(self, error: str | None) -> None:
        if self._breaker is None:
            return
        change = self._breaker.record(error, now())
        if change == "opened":
            log.warning(
                "mirror_target_down",
                target=self.target,
                upstream=self.upstream.url(""),
                pause_seconds=self._breaker.cooldown,
                failures=self._breaker.failures,
            )
        elif change == "closed":
            log.warning("mirror_target_back", target=self.target)

    async def drain(self, grace: float) -> None:
        """Let running mirrors finish within the deadline, then cancel the rest (recorded as such)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        if pending:
            log.warning("mirrors_cancelled_at_shutdown", count=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

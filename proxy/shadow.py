"""The owned, bounded set of mirror tasks: never awaited by a request handler, drained at shutdown.

A mirror is its own task, not the handler's: a client disconnect does not cancel it, and a slow
or failing candidate only ever costs a slot in this set. When the set is full the mirror is
dropped and counted, never queued behind the live path.
"""

from __future__ import annotations

import asyncio

import structlog

from .breaker import Breaker
from .config import ShadowConfig
from .exchange import ArmCapture, Exchange, now
from .metrics import Metrics
from .upstream import Upstream

log = structlog.get_logger("shadow_proxy.shadow")


class ShadowDispatcher:
    """Runs mirrors to one upstream, at most ``max_in_flight`` at a time."""

    def __init__(
        self,
        upstream: Upstream,
        config: ShadowConfig,
        metrics: Metrics,
        *,
        capture_cap: int,
        target: str = "candidate",
        role: str = "shadow",
    ) -> None:
        self.upstream = upstream
        self.target = target
        self.role = role
        self._config = config
        self._metrics = metrics
        self._cap = capture_cap
        self._tasks: set[asyncio.Task[None]] = set()
        self._breaker = Breaker(config.breaker_failures, config.breaker_cooldown) if config.breaker_failures else None
        self._gauge = metrics.mirrors_in_flight.labels(target)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def dispatch(self, exchange: Exchange, raw_path_qs: str, headers: list[tuple[str, str]]) -> ArmCapture | None:
        """Start a mirror of the exchange's request; None (and counted) when the set is full or the
        target refuses connections (the breaker is open)."""
        if len(self._tasks) >= self._config.max_in_flight:
            self._metrics.mirrors_skipped.labels(self.target, "full").inc()
            exchange.shadow_skipped = "full"
            return None
        if self._breaker is not None and not self._breaker.allow(now()):
            self._metrics.mirrors_skipped.labels(self.target, "target_down").inc()
            exchange.shadow_skipped = "target_down"
            return None
        arm = ArmCapture(self.upstream.name, self.role, self._cap, start=now())
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
            failure = await self.upstream.capture(arm, exchange.method, raw_path_qs, headers, exchange.body)
            if failure is not None:
                self._metrics.mirrors_failed.labels(self.target, failure.error).inc()
                self._metrics.upstream_errors.labels(self.upstream.name, arm.role, failure.error).inc()
                log.debug("mirror_failed", error=failure.error, detail=failure.detail)
            self._account_breaker(failure.error if failure is not None else None)
        except asyncio.CancelledError:
            arm.finish(now(), "cancelled_at_shutdown")
            self._metrics.mirrors_failed.labels(self.target, "cancelled_at_shutdown").inc()
            raise
        finally:
            if arm.end is not None and arm.error is None:
                self._metrics.upstream_latency.labels(self.upstream.name, arm.role).observe(arm.end - arm.start)
            self._gauge.dec()
            exchange.arm_done()

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

"""The owned, bounded set of mirror tasks: never awaited by a request handler, drained at shutdown.

A mirror is its own task, not the handler's: a client disconnect does not cancel it, and a slow
or failing candidate only ever costs a slot in this set. When the set is full the mirror is
dropped and counted, never queued behind the live path.
"""

from __future__ import annotations

import asyncio

import structlog

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

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def dispatch(self, exchange: Exchange, raw_path_qs: str, headers: list[tuple[str, str]]) -> ArmCapture | None:
        """Start a mirror of the exchange's request; None (and counted) when the set is full."""
        if len(self._tasks) >= self._config.max_in_flight:
            self._metrics.mirrors_skipped.labels(self.target, "full").inc()
            return None
        arm = ArmCapture(self.upstream.name, self.role, self._cap, start=now())
        exchange.expect_arm()
        headers = [*headers, (self._config.marker_header, self._config.marker_value)]
        task = asyncio.create_task(self._mirror(exchange, arm, raw_path_qs, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._metrics.mirrors_sent.labels(self.target).inc()
        self._metrics.mirrors_in_flight.labels(self.target).set(len(self._tasks))
        return arm

    async def _mirror(
        self, exchange: Exchange, arm: ArmCapture, raw_path_qs: str, headers: list[tuple[str, str]]
    ) -> None:
        try:
            failure = await self.upstream.capture(arm, exchange.method, raw_path_qs, headers, exchange.body)
            if failure is not None:
                self._metrics.mirrors_failed.labels(self.target, failure.error).inc()
                self._metrics.upstream_errors.labels(self.upstream.name, arm.role, failure.error).inc()
                log.info("mirror_failed", error=failure.error, detail=failure.detail)
        except asyncio.CancelledError:
            arm.finish(now(), "cancelled_at_shutdown")
            self._metrics.mirrors_failed.labels(self.target, "cancelled_at_shutdown").inc()
            raise
        finally:
            if arm.end is not None and arm.error is None:
                self._metrics.upstream_latency.labels(self.upstream.name, arm.role).observe(arm.end - arm.start)
            self._metrics.mirrors_in_flight.labels(self.target).set(len(self._tasks) - 1)
            exchange.arm_done()

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

"""The owned, bounded set of mirror tasks: never awaited by a request handler, drained at shutdown.

A mirror is its own task, not the handler's: a client disconnect does not cancel it, and a slow
or failing candidate only ever costs a slot in this set. When the set is full the mirror is
dropped and counted, never queued behind the live path. A target that does not answer is ejected
by its breaker (``breaker.py``): its mirrors waiting past the slow threshold (learned from its own
answers, at most ``slow_after``) are cancelled (recorded with error "ejected"), so it holds a few slots,
not all of them, until a probe finds it answering again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .breaker import STATE_VALUES, Breaker, Change, SlowThreshold
from .budget import SpendLedger
from .config import ShadowConfig
from .exchange import ArmCapture, Exchange, now
from .metrics import Metrics
from .routing import MirrorPolicy
from .upstream import Upstream

CostOf = Callable[[ArmCapture, bytes], float | None]
# Costing a larger answer (parse, tokenizer) runs in a thread rather than between live requests.
COST_INLINE_BYTES = 32 * 1024
SLOW_TICK = 0.25  # seconds between looks for slow mirrors (or a quarter of slow_floor or slow_after)

log = structlog.get_logger("shadow_proxy.shadow")


@dataclass(slots=True, eq=False)
class _Flight:
    """One running mirror: its capture, its task, when it becomes slow; ``judged`` once the breaker has its outcome."""

    arm: ArmCapture
    task: asyncio.Task[None] | None = None
    slow_at: float = math.inf
    judged: bool = False

    @property
    def waiting(self) -> bool:
        """Still waiting for the response headers."""
        return self.arm.first_byte is None and self.arm.end is None


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
        slow_after: float | None = None,
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
        self._flights: dict[asyncio.Task[None], _Flight] = {}
        # asyncio.get_running_loop() (and so asyncio.create_task) calls getpid() on Python 3.11: a system call
        # per use, twice per mirror. The dispatcher lives on one loop: look it up once.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._breaker = (
            Breaker(config.breaker_failures, config.breaker_cooldown, config.breaker_max_cooldown)
            if config.breaker_failures
            else None
        )
        self._slow_after = config.slow_after if slow_after is None else slow_after
        self._slow = (
            SlowThreshold(self._slow_after, config.slow_factor, config.slow_floor, config.slow_min_samples)
            if self._breaker is not None and self._slow_after > 0
            else None
        )
        # One watchdog timer per target finds the mirrors that became slow (a timer per mirror is a libuv handle
        # allocated, started and stopped each time): a mirror is found slow up to ``_tick`` late.
        self._tick = max(0.01, min(SLOW_TICK, config.slow_floor / 4, self._slow_after / 4))
        self._watchdog: asyncio.TimerHandle | None = None
        self._gauge = metrics.mirrors_in_flight.labels(target)
        self._state_gauge = metrics.mirror_breaker_state.labels(target)
        self._state_gauge.set(0)
        self._state_value = 0  # what the gauge holds: set() takes a lock, so only on a change
        self._slow_gauge = metrics.mirror_slow_after.labels(target)
        self._slow_gauge.set(self._slow.value if self._slow is not None else 0)
        self._warned_unpriced = False

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def skip_reason(self, exchange: Exchange) -> str | None:
        """Why this exchange gets no mirror from this target (a metric label), or None to mirror it."""
        reason = self.policy.skip_reason(
            method=exchange.method, path=exchange.path, request_id=exchange.request_id, body_size=len(exchange.body)
        )
        if reason is not None:
            return reason
        if len(self._flights) >= self._max_in_flight:
            return "full"
        if self.ledger is not None and self.ledger.exhausted(time.time()):
            return "budget"
        # Last: allow() may hand out the breaker's one probe, which must then really be sent.
        if self._breaker is not None:
            allowed = self._breaker.allow(now())
            self._show_state(self._breaker)
            if not allowed:
                return "target_down"
        return None

    def dispatch(self, exchange: Exchange, raw_path_qs: str, headers: list[tuple[str, str]]) -> ArmCapture | None:
        """Start a mirror of the exchange's request; None (skipped, counted and noted in the exchange)
        when this target does not want it, its set is full, it refuses connections or its budget is spent."""
        reason = self.skip_reason(exchange)
        if reason is not None:
            self._metrics.child(self._metrics.mirrors_skipped, self.target, reason).inc()
            if self.role == "shadow":
                exchange.shadow_skipped[self.upstream.name] = reason
            return None
        arm = ArmCapture(self.upstream.name, self.role, self._cap, start=now())
        if self.ledger is not None:
            arm.tail = bytearray()
        exchange.expect_arm()
        headers = [*headers, (self._config.marker_header, self._config.marker_value)]
        flight = _Flight(arm)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = flight.task = loop.create_task(self._mirror(exchange, flight, raw_path_qs, headers))
        self._flights[task] = flight
        task.add_done_callback(self._forget)
        if self._breaker is not None and self._slow is not None:
            # A probe waits the whole slow_after: the target's latency may have changed while it was ejected.
            after = self._slow_after if self._breaker.probing else self._slow.value
            flight.slow_at = arm.start + after
            if self._watchdog is None:
                self._watchdog = loop.call_later(self._tick, self._find_slow)
        self._metrics.child(self._metrics.mirrors_sent, self.target).inc()
        self._gauge.inc()
        return arm

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._flights.pop(task, None)

    def _find_slow(self) -> None:
        """The watchdog: each mirror whose slow threshold has passed is judged (once), then it looks again later
        while mirrors run."""
        self._watchdog = None
        at = now()
        for flight in list(self._flights.values()):
            if flight.slow_at <= at:
                flight.slow_at = math.inf
                self._on_slow(flight)
        if self._flights and self._loop is not None:
            self._watchdog = self._loop.call_later(self._tick, self._find_slow)

    async def _mirror(
        self, exchange: Exchange, flight: _Flight, raw_path_qs: str, headers: list[tuple[str, str]]
    ) -> None:
        arm = flight.arm
        try:
            # Shaped here, in the mirror's own task: the live path never pays for another arm's rewrite.
            shaped = self.upstream.shaping.apply(exchange.body, headers)
            arm.model = shaped.model
            failure = await self.upstream.capture(arm, exchange.method, raw_path_qs, shaped.headers, shaped.body)
            if failure is not None:
                self._metrics.mirrors_failed.labels(self.target, failure.error).inc()
                self._metrics.upstream_errors.labels(self.upstream.name, arm.role, failure.error).inc()
                log.debug("mirror_failed", error=failure.error, detail=failure.detail)
            change = self._judge(flight, failure.error if failure is not None else None)
            self._learn(arm, readmitted=change == "closed")
            # Billed: answered, even when the stream was cut short; refused (4xx/5xx) calls are not.
            if self.ledger is not None and self._cost_of is not None and arm.status is not None and arm.status < 400:
                await self._charge(self.ledger, self._cost_of, arm, shaped.body)
        except asyncio.CancelledError:
            arm.finish(now(), "cancelled_at_shutdown")  # unless the breaker cancelled it: then "ejected"
            self._metrics.mirrors_failed.labels(self.target, arm.error or "cancelled_at_shutdown").inc()
            raise
        finally:
            if arm.end is not None and arm.error is None:
                latency = self._metrics.child(self._metrics.upstream_latency, self.upstream.name, arm.role)
                latency.observe(arm.end - arm.start)
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

    def _learn(self, arm: ArmCapture, *, readmitted: bool) -> None:
        """A successful answer's time to headers feeds the slow threshold (a fast error says nothing about
        how long answers take); the answer that readmitted the target may restart the learning."""
        if self._slow is None or arm.first_byte is None or arm.status is None or arm.status >= 400:
            return
        seconds = arm.first_byte - arm.start
        was = self._slow.value
        reset = readmitted and self._slow.readmitted(seconds)
        if reset:
            log.warning("mirror_slow_threshold_reset", target=self.target, answered_seconds=seconds, was=was)
        if self._slow.observe(seconds) or reset:
            self._slow_gauge.set(self._slow.value)

    def _on_slow(self, flight: _Flight) -> None:
        """The slow threshold passed since the mirror started: without headers yet it is a breaker failure,
        and while the target is ejected it gives its slot back at once."""
        if not flight.waiting or flight.judged:
            return
        self._metrics.mirrors_slow.labels(self.target).inc()
        self._judge(flight, "slow")
        if self._breaker is not None and self._breaker.open:
            self._eject(flight)

    def _judge(self, flight: _Flight, error: str | None) -> Change | None:
        """Give the breaker this mirror's outcome, once (a slow mirror was judged when it became slow)."""
        if self._breaker is None or flight.judged:
            return None
        flight.judged = True
        change = self._breaker.record(error, now())
        self._show_state(self._breaker)
        if change is not None:
            self._on_change(change)
        return change

    def _show_state(self, breaker: Breaker) -> None:
        value = STATE_VALUES[breaker.state]
        if value != self._state_value:
            self._state_gauge.set(value)
            self._state_value = value

    def _on_change(self, change: Change) -> None:
        assert self._breaker is not None
        if change == "closed":
            log.warning("mirror_target_back", target=self.target)
            return
        self._metrics.mirror_ejections.labels(self.target).inc()
        log.warning(
            "mirror_target_down",
            target=self.target,
            upstream=self.upstream.url(""),
            pause_seconds=self._breaker.pause,
            ejections=self._breaker.ejections,
            failures=self._breaker.failures,
        )
        # Mirrors already found slow would hold their slots until the read timeout: give them back now.
        # Younger ones follow when the watchdog finds them slow.
        for other in list(self._flights.values()):
            if other.judged and other.waiting:
                self._eject(other)

    def _eject(self, flight: _Flight) -> None:
        """Cancel a mirror that is still waiting for headers; it is recorded with error "ejected"."""
        if flight.task is not None and not flight.task.done() and flight.waiting:
            flight.arm.finish(now(), "ejected")
            flight.task.cancel()

    async def drain(self, grace: float) -> None:
        """Let running mirrors finish within the deadline, then cancel the rest (recorded as such)."""
        if not self._flights:
            return
        _, pending = await asyncio.wait(set(self._flights), timeout=grace)
        if pending:
            log.warning("mirrors_cancelled_at_shutdown", count=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

"""The proxy's view of the canary weight: a local value, pushed by pub/sub, polled as a fallback.

The live path reads ``WeightWatcher.weight`` (a float attribute) and never waits on Redis. When Redis
is unreachable the last known weight stays in force and the watcher keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import structlog

from ..metrics import Metrics
from ..redis import Backoff, CanaryStore, StoreUnavailable
from ..supervisor import Health, Supervisor, start_loop
from .state import CanaryState

log = structlog.get_logger("shadow_proxy.canary")


class WeightWatcher:
    """Keeps ``weight`` and ``state`` current in one proxy process."""

    def __init__(
        self, store: CanaryStore, metrics: Metrics, *, poll_interval: float, health: Health | None = None
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._poll_interval = poll_interval
        self.health = health or Health("canary-weights")
        self.weight = 0.0
        self.state: CanaryState | None = None
        self._task: asyncio.Task[None] | None = None

    def _apply(self, state: CanaryState | None) -> None:
        if state is None:
            return
        if self.state is None or state.version >= self.state.version:
            if state.weight != self.weight:
                log.info("canary_weight_changed", weight=state.weight, stage=state.stage, status=state.status)
            self.state = state
            self.weight = state.weight
            self._metrics.canary_weight.set(state.weight)
            self._metrics.canary_stage.set(state.stage)

    def start(self, supervisor: Supervisor | None = None) -> None:
        self._task = start_loop(supervisor, self.health.name, self.run)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        self._apply(await self._store.state())

    async def run(self) -> None:
        """Subscribe, refresh, and apply each published state; on any Redis failure back off and start again."""
        backoff = Backoff(0.1, self._poll_interval)
        while True:
            try:
                async with self._store.subscribe() as subscription:
                    await self.refresh()
                    self.health.up()
                    backoff.reset()
                    while True:
                        data = await subscription.message(self._poll_interval)
                        if data is not None:
                            self._apply(CanaryState.from_dict(orjson.loads(data)))
                        else:
                            await self.refresh()  # the polling fallback
            except StoreUnavailable as exc:
                if self.health.ok:
                    log.warning("canary_weight_refresh_failed", error=str(exc), weight=self.weight)
                self.health.down(f"redis {exc.kind}")
                await asyncio.sleep(backoff.next())

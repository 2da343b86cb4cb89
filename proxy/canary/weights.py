"""The proxy's view of the canary weight: a local value, pushed by pub/sub, polled as a fallback.

The live path reads ``WeightWatcher.weight`` (a float attribute) and never waits on Redis. When Redis
is unreachable the last known weight stays in force and the watcher keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError

from ..metrics import Metrics
from ..store import StoreUnavailable
from .state import CanaryState
from .store import CanaryStore

log = structlog.get_logger("shadow_proxy.canary")


class WeightWatcher:
    """Keeps ``weight`` and ``state`` current in one proxy process."""

    def __init__(self, store: CanaryStore, metrics: Metrics, *, poll_interval: float) -> None:
        self._store = store
        self._metrics = metrics
        self._poll_interval = poll_interval
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

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="canary-weights")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        self._apply(await self._store.state())

    async def _run(self) -> None:
        while True:
            pubsub: Any = None
            try:
                pubsub = self._store.pubsub()
                await pubsub.subscribe(self._store.channel)
                await self.refresh()
                while True:
                    message = await pubsub.get_message(timeout=self._poll_interval)
                    if message is not None and message.get("type") == "message":
                        self._apply(CanaryState.from_dict(orjson.loads(message["data"])))
                    else:
                        await self.refresh()  # the polling fallback
            except (RedisError, OSError, StoreUnavailable) as exc:
                log.warning("canary_weight_refresh_failed", error=str(exc), weight=self.weight)
                await asyncio.sleep(self._poll_interval)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()

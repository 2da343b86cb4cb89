"""Hands finished exchanges to Redis without ever blocking or raising into the live path.

``submit`` is synchronous and O(1): it appends to a queue bounded in records and bytes, or drops
and counts. One writer task serialises, redacts and writes batches; while Redis is down the batch
waits (inside the bound) and is retried, so writing resumes by itself when Redis comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque

import structlog

from .config import RecordConfig
from .exchange import Exchange
from .metrics import Metrics
from .redaction import Redactor
from .store import RecordStore, StoreUnavailable

log = structlog.get_logger("shadow_proxy.recorder")


class Recorder:
    """A bounded queue of exchanges and the task that writes them in pipelined batches."""

    def __init__(self, store: RecordStore, config: RecordConfig, metrics: Metrics) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._redactor = Redactor(config)
        self._queue: deque[tuple[Exchange, int]] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.redis_ok = True

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, exchange: Exchange) -> None:
        """Queue an exchange for writing, or drop and count it when the queue is full or closed."""
        if self._closing:
            self._drop("shutdown")
            return
        size = exchange.size_hint()
        if (
            len(self._queue) >= self._config.queue_max_records
            or self._queued_bytes + size > self._config.queue_max_bytes
        ):
            self._drop("queue_full")
            return
        self._queue.append((exchange, size))
        self._queued_bytes += size
        self._metrics.records_queued.inc()
        self._wakeup.set()

    def _drop(self, reason: str, count: int = 1) -> None:
        self._metrics.records_dropped.labels(reason).inc(count)
        log.debug("record_dropped", reason=reason, count=count)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recorder")

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                if self._config.linger > 0 and not self._closing:
                    # Gather a batch: one write per linger period instead of one per record keeps the
                    # writer's work in few, short slices between live requests.
                    await asyncio.sleep(self._config.linger)
                continue
            batch = [item for item, _ in itertools.islice(self._queue, self._config.batch_size)]
            entries = [exchange.to_fields(self._redactor, self._config.max_body_bytes) for exchange in batch]
            try:
                await self._store.append(entries)
            except StoreUnavailable as exc:
                self._metrics.record_write_errors.inc()
                if self.redis_ok:
                    log.warning("record_write_failed", error=str(exc), queued=len(self._queue))
                self.redis_ok = False
                await asyncio.sleep(self._config.retry_interval)
                continue
            if not self.redis_ok:
                log.warning("record_write_resumed", queued=len(self._queue))
            self.redis_ok = True
            for _ in batch:
                _, size = self._queue.popleft()
                self._queued_bytes -= size
            self._metrics.records_written.inc(len(batch))
            self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.record_queue_depth.set(len(self._queue))
        self._metrics.record_queue_bytes.set(self._queued_bytes)

    async def close(self, grace: float) -> None:
        """Flush what is queued within the deadline; whatever is left is dropped and counted."""
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if self._queue:
                log.warning("record_flush_incomplete", dropped=len(self._queue))
                self._drop("shutdown", len(self._queue))
                self._queue.clear()
        self._update_gauges()

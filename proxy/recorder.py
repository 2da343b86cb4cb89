"""Hands finished exchanges to Redis without ever blocking or raising into the live path.

``submit`` is synchronous and O(1): it appends to a queue bounded in records and in the bytes the
records will keep (bodies cut at ``record.max_body_bytes``), or drops and counts. One writer task
serialises and redacts each record once, then writes batches; while Redis is down the serialised
batch waits (inside the bound, still counted in the queue gauges) and is retried with backoff, so
writing resumes by itself when Redis comes back. With ``record.spool_dir`` every record goes to the
disk spool first and a sender writes from there (``docs/spool.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog

from .config import ConfigError, RecordConfig
from .exchange import Exchange
from .metrics import Metrics
from .redaction import Redactor
from .redis import Backoff, RecordWriter, StoreUnavailable
from .spool import Spool, SpoolLocked
from .supervisor import Health, Supervisor, start_loop

log = structlog.get_logger("shadow_proxy.recorder")

Fields = dict[bytes, bytes]


class Recorder:
    """A bounded queue of exchanges and the task that writes them in pipelined batches."""

    def __init__(
        self, writer: RecordWriter, config: RecordConfig, metrics: Metrics, *, health: Health | None = None
    ) -> None:
        self._writer = writer
        self._config = config
        self._metrics = metrics
        self._redactor = Redactor(config, lambda kind: metrics.child(metrics.bodies_withheld, kind).inc())
        self._queue: deque[tuple[Exchange, int]] = deque()  # not yet serialised, with their estimated size
        self._ready: deque[tuple[Fields, int]] = deque()  # serialised, waiting for Redis, with their size
        self._queued_bytes = 0  # both of the above
        self._wakeup = asyncio.Event()
        self._sent = asyncio.Event()  # something was spooled: the sender has work
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.health = health or Health("recorder")
        self.spool: Spool | None = None
        self._spooled = 0  # records in the spool not yet in Redis (as of the last spool call)

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._ready) + self._spooled

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def redis_ok(self) -> bool:
        return self.health.ok

    def submit(self, exchange: Exchange) -> None:
        """Queue an exchange for writing, or drop and count it when the queue is full or closed."""
        if self._closing:
            self._drop("shutdown")
            return
        size = exchange.size_hint(self._config.max_body_bytes)
        in_memory = len(self._queue) + len(self._ready)  # the spool has its own bound
        if in_memory >= self._config.queue_max_records or self._queued_bytes + size > self._config.queue_max_bytes:
            self._drop("queue_full")
            return
        self._queue.append((exchange, size))
        self._queued_bytes += size
        self._metrics.records_queued.inc()
        self._wakeup.set()

    def _drop(self, reason: str, count: int = 1) -> None:
        self._metrics.records_dropped.labels(reason).inc(count)
        log.debug("record_dropped", reason=reason, count=count)

    def open_spool(self, worker: int = 0) -> None:
        """Open the disk spool (``record.spool_dir``): the first of its ``w<N>`` subdirectories no other
        live process holds, so each worker of a host has its own and a restarted one takes over any."""
        config = self._config
        if not config.spool_dir or self.spool is not None:
            return
        for index in range(worker, worker + 256):
            try:
                self.spool = Spool(
                    f"{config.spool_dir}/w{index}", max_bytes=config.spool_max_bytes, fsync=config.spool_fsync
                )
                break
            except SpoolLocked:
                continue
            except OSError as exc:
                raise ConfigError(
                    f"invalid config key record.spool_dir = {config.spool_dir!r}: {exc.strerror or exc}: "
                    "give a directory this process can create and write, or leave it empty (no spool)"
                ) from exc
        else:
            raise ConfigError(
                f"invalid config key record.spool_dir = {config.spool_dir!r}: its 256 w<N> subdirectories are all "
                "in use by other live processes: give each deployment its own directory"
            )
        self._spooled = self.spool.pending_records
        if self._spooled:
            self._metrics.spool_recovered.inc(self._spooled)
            log.warning("spool_recovered", records=self._spooled, directory=str(self.spool.directory))
        self._update_gauges()

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Start the writer loop (restarted by ``supervisor`` if anything escapes it)."""
        self.open_spool()
        self._task = start_loop(supervisor, self.health.name, self.run)

    async def run(self) -> None:
        """The writer loop; returns once closing and everything queued is written (or spooled)."""
        if self.spool is not None:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._spool_in(self.spool))
                group.create_task(self._send_from(self.spool))
            return
        backoff = self._backoff()
        while await self._gathered():
            if not self._ready:
                continue
            batch = [fields for fields, _ in list(self._ready)[: self._config.batch_size]]
            try:
                await self._writer.append(batch)
            except StoreUnavailable as exc:
                self._write_failed(exc)
                await asyncio.sleep(backoff.next())
                continue
            self._forget(len(batch))
            self._written(len(batch), backoff)

    def _backoff(self) -> Backoff:
        return Backoff(self._config.retry_interval / 4, max(self._config.retry_interval, 5.0))

    async def _gathered(self) -> bool:
        """Wait for records (then linger to gather a batch) and serialise one batch more; False once closing
        with nothing left. Serialising on each turn (also while Redis is down) releases full request
        bodies early, and every record is serialised and redacted once."""
        while not self._queue and not self._ready:
            if self._closing:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
            if self._config.linger > 0 and not self._closing:
                # One write per linger period instead of one per record keeps the writer's work in few,
                # short slices between live requests.
                await asyncio.sleep(self._config.linger)
        self._serialise(self._config.batch_size)
        return True

    def _forget(self, count: int) -> None:
        """Release the first ``count`` serialised records (written to Redis, or to the spool)."""
        for _ in range(count):
            _, size = self._ready.popleft()
            self._queued_bytes -= size

    def _write_failed(self, exc: StoreUnavailable) -> None:
        self._metrics.record_write_errors.inc()
        self.health.down(f"redis {exc.kind}")
        if self.health.failures == 1:
            log.warning("record_write_failed", error=str(exc), queued=self.depth)
        self._update_gauges()

    def _written(self, count: int, backoff: Backoff) -> None:
        if not self.health.ok:
            log.warning("record_write_resumed", queued=self.depth)
        self.health.up()
        backoff.reset()
        self._metrics.records_written.inc(count)
        self._update_gauges()

    async def _spool_in(self, spool: Spool) -> None:
        """Memory queue to disk, at once: while Redis is away records wait on disk, not in memory."""
        while await self._gathered():
            batch = [fields for fields, _ in self._ready]
            accepted = await asyncio.to_thread(spool.append, batch)
            self._forget(len(batch))
            if accepted < len(batch):
                self._drop("spool_full", len(batch) - accepted)
            self._spooled = spool.pending_records
            self._sent.set()
            self._update_gauges()

    async def _send_from(self, spool: Spool) -> None:
        """Disk to Redis in order; what Redis has is committed (deleted from the spool), the rest retried."""
        backoff = self._backoff()
        down = False
        while True:
            if down:
                # Redis refused the last batch: a PING says when it is back. Reading and rewinding the spool on
                # each retry would hold its lock against the records being spooled in meanwhile.
                up, why = await self._writer.ping()
                if not up:
                    self._write_failed(StoreUnavailable(f"redis still unavailable ({why})", kind=why))
                    await asyncio.sleep(backoff.next())
                    continue
                down = False
            batch, cursor = await asyncio.to_thread(spool.read, self._config.batch_size, 8 * 1024**2)
            if not batch:
                if self._closing and not self._queue and not self._ready:
                    return
                self._sent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._sent.wait(), 1.0)
                continue
            try:
                await self._writer.append(batch)
            except StoreUnavailable as exc:
                await asyncio.to_thread(spool.rewind)
                self._write_failed(exc)
                down = True
                await asyncio.sleep(backoff.next())
                continue
            await asyncio.to_thread(spool.commit, cursor)
            self._spooled = spool.pending_records
            self._written(len(batch), backoff)

    def _serialise(self, count: int) -> None:
        cap = self._config.max_body_bytes
        for _ in range(min(count, len(self._queue))):
            exchange, estimate = self._queue.popleft()
            self._queued_bytes -= estimate
            try:
                fields = {k.encode(): v for k, v in exchange.to_fields(self._redactor, cap).items()}
            except Exception as exc:  # noqa: BLE001 - one bad exchange must not stop the writer
                self._drop("unserialisable")
                log.error("record_unserialisable", request_id=exchange.request_id, error=f"{type(exc).__name__}: {exc}")
                continue
            size = sum(len(k) + len(v) for k, v in fields.items())
            self._ready.append((fields, size))
            self._queued_bytes += size

    def _update_gauges(self) -> None:
        self._metrics.record_queue_depth.set(self.depth)
        self._metrics.record_queue_bytes.set(self._queued_bytes)
        if self.spool is not None:
            self._metrics.spool_records.set(self._spooled)
            self._metrics.spool_bytes.set(self.spool.disk_bytes)

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
            if self.spool is not None:
                # Whatever Redis did not take stays on disk for the next start; only memory is lost.
                self._serialise(len(self._queue))
                accepted = self.spool.append([fields for fields, _ in self._ready]) if self._ready else 0
                if accepted < len(self._ready):
                    self._drop("shutdown", len(self._ready) - accepted)
                self._ready.clear()
                self._queued_bytes = 0
                log.warning("record_flush_left_in_spool", records=self.spool.pending_records)
            if self.depth and self.spool is None:
                log.warning("record_flush_incomplete", dropped=self.depth)
                self._drop("shutdown", self.depth)
                self._queue.clear()
                self._ready.clear()
                self._queued_bytes = 0
        self._update_gauges()
        if self.spool is not None:
            self.spool.close()

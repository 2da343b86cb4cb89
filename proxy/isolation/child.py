"""The shadow process: the candidate's side of one serving process, on an event loop of its own.

It runs the mirror dispatchers (candidates, the A/A copy, the canary's reverse shadow), their spend sync and
the recorder with its own Redis clients, built from the same config as inline mode. A REQ frame becomes an
exchange and its mirrors at once; the DONE frame fills the exchange's live arm, and the record is written
when its mirrors have ended too. Requests whose DONE never comes are forgotten after
``shadow.isolation_pending_timeout`` (counted); at most ``shadow.isolation_max_pending`` wait at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time

import orjson
import structlog
import uvloop

from .. import logs
from ..comparator.offload import die_with_parent
from ..comparator.pricing import warm as warm_pricing
from ..config import Config
from ..exchange import Exchange
from ..shadow import ShadowDispatcher
from ..wiring import Runtime
from .frames import DONE, PREFIX, REQ, exchange_of, fill_live

log = structlog.get_logger("shadow_proxy.isolation")


def main(config: Config, path: str, parent: int) -> None:
    """Entry point of the spawned shadow process."""
    die_with_parent()
    # Ctrl-C reaches the whole process group: the serving process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(config.proxy.log_level, config.proxy.log_format)
    uvloop.run(_run(config, path, parent))


async def _run(config: Config, path: str, parent: int) -> None:
    inline = config.shadow.model_copy(update={"isolation": "inline"})
    side = ShadowSide(Runtime.build(config.model_copy(update={"shadow": inline})), config)
    await side.start()
    stop = asyncio.Event()
    # SIGTERM: only when the serving process is gone (PR_SET_PDEATHSIG); otherwise its STOP frame says when.
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGTERM, lambda: stop.set() if os.getppid() != parent else None
    )
    try:
        reader, _ = await asyncio.open_unix_connection(path)
        gc.collect()
        gc.freeze()
        reading = asyncio.create_task(side.serve(reader))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reading, stopping):
            task.cancel()
    finally:
        await side.close()


class ShadowSide:
    """The dispatchers and recorder of one serving process, fed by frames."""

    def __init__(self, runtime: Runtime, config: Config) -> None:
        self._runtime = runtime
        self._config = config
        self._metrics = runtime.metrics
        self._pending: dict[str, tuple[Exchange, float]] = {}  # by record id, oldest first
        self._mirrors: dict[str, tuple[ShadowDispatcher, ...]] = {"incumbent": runtime.shadows}
        canary = runtime.canary
        if canary is not None and canary.live_candidate is not None:
            # While the candidate serves, the incumbent is mirrored instead, and the other candidates still are.
            others = tuple(s for s in runtime.shadows if s.upstream.name != canary.live_candidate.name)
            reverse = (canary.reverse,) if canary.reverse is not None else ()
            self._mirrors[canary.live_candidate.name] = reverse + others
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        runtime = self._runtime
        if any(d.ledger is not None for d in runtime.shadows):
            await asyncio.to_thread(warm_pricing)
        for dispatcher in runtime.dispatchers():
            await dispatcher.upstream.start()
        if runtime.recorder is not None:
            runtime.recorder.start(runtime.supervisor)
        if runtime.spend is not None:
            runtime.spend.start(runtime.supervisor)
        self._sweeper = asyncio.create_task(self._sweep(), name="pending-sweep")

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Read frames until the serving process says STOP or goes away."""
        while True:
            try:
                lengths = await reader.readexactly(PREFIX.size)
                head, size = PREFIX.unpack(lengths)
                data = await reader.readexactly(head + size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            header = orjson.loads(data[:head])
            kind = header["t"]
            if kind == REQ:
                self.on_request(header, data[head:])
            elif kind == DONE:
                self.on_done(header, data[head:])
            else:
                return

    def on_request(self, header: dict[str, object], body: bytes) -> None:
        """Start the request's mirrors; keep it until its live arm ends when it is to be recorded."""
        exchange, raw_target, headers = exchange_of(header, body)
        recorder = self._runtime.recorder
        if recorder is not None:
            if len(self._pending) < self._config.shadow.isolation_max_pending:
                exchange.on_complete = recorder.submit
                self._pending[exchange.request_id] = (exchange, time.monotonic())
            else:
                self._metrics.records_dropped.labels("pending_full").inc()
        serving = exchange.live.upstream if exchange.live is not None else "incumbent"
        for mirror in self._mirrors.get(serving, ()):
            arm = mirror.dispatch(exchange, raw_target, headers)
            if arm is not None:
                exchange.shadows.append(arm)
        noise = self._runtime.noise
        if noise is not None:
            exchange.noise = noise.dispatch(exchange, raw_target, headers)

    def on_done(self, header: dict[str, object], payload: bytes) -> None:
        entry = self._pending.pop(str(header["id"]), None)
        if entry is None:
            return  # over the pending bound at its REQ (counted then), or expired (counted then)
        exchange = entry[0]
        fill_live(exchange, header, payload)
        exchange.arm_done()

    async def _sweep(self) -> None:
        """Forget requests whose live end never came (their record is dropped, reason live_lost)."""
        timeout = self._config.shadow.isolation_pending_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            cutoff = time.monotonic() - timeout
            while self._pending:
                record_id, (exchange, since) = next(iter(self._pending.items()))
                if since > cutoff:
                    break
                del self._pending[record_id]
                exchange.on_complete = None
                self._metrics.records_dropped.labels("live_lost").inc()

    async def close(self) -> None:
        """Drain mirrors, flush the recorder, close pools and Redis (the inline shutdown's order)."""
        runtime = self._runtime
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for dispatcher in runtime.dispatchers():
            await dispatcher.drain(self._config.shadow.drain_timeout)
        if self._pending:
            self._metrics.records_dropped.labels("live_lost").inc(len(self._pending))
            self._pending.clear()
        if runtime.recorder is not None:
            await runtime.recorder.close(self._config.record.flush_timeout)
        if runtime.spend is not None:
            await runtime.spend.close()
        for dispatcher in runtime.dispatchers():
            await dispatcher.upstream.close()
        await runtime.supervisor.stop()
        if runtime.canary is not None:
            await runtime.canary.controller.close()
        if runtime.clients is not None:
            await runtime.clients.close()
        log.info("shadow_process_stopped")

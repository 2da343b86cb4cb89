"""The serving process's side of ``shadow.isolation = "process"``: hands requests to its shadow process.

The handler's whole cost is two ``transport.write`` calls per request (REQ at arrival, DONE when the live
arm ended), never awaited: over ``shadow.isolation_buffer_bytes`` unsent, or while the shadow process is
down, the mirrors the request was due are counted as skipped and its record as dropped (reason
``shadow_down``). The link owns the shadow process: spawned at startup, respawned with backoff when it
dies (``shadow_proxy_loop_restarts_total{loop="shadow-process"}``), asked to drain and flush at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import shutil
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import cast

import structlog
from prometheus_client import multiprocess

from ..config import Config
from ..exchange import Exchange
from ..metrics import Metrics
from ..redis import Backoff
from ..routing import MirrorPolicy
from ..supervisor import Health
from .frames import done_frame, frame, request_frame

log = structlog.get_logger("shadow_proxy.isolation")

# Mirror targets by the upstream serving the request: (target name, its pure sampling policy).
Targets = dict[str, tuple[tuple[str, MirrorPolicy], ...]]
SHADOW_DOWN = "shadow_down"
STOP = "x"
HEALTHY_AFTER = 30.0  # a shadow process that lived this long restarts without the accumulated backoff


class _Protocol(asyncio.Protocol):
    def __init__(self, link: ShadowLink) -> None:
        self._link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's Unix transport is not an asyncio.Transport subclass, though it has its methods.
        self._link.connected(cast(asyncio.Transport, transport))

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.lost(self)


class ShadowLink:
    """One shadow process and the socket to it; ``request`` is all the handler calls."""

    def __init__(self, config: Config, metrics: Metrics, targets: Targets, health: Health) -> None:
        self._config = config
        self._metrics = metrics
        self._targets = targets
        self._health = health
        self._recording = config.record.enabled
        self._bound = config.shadow.isolation_buffer_bytes
        self._transport: asyncio.Transport | None = None
        self._owner: _Protocol | None = None
        self._generation = 0  # one per connection: a DONE goes only where its REQ went
        self._connected = asyncio.Event()
        self._closing = False
        self._process: BaseProcess | None = None
        self._server: asyncio.AbstractServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._dir = ""

    def closing(self) -> bool:
        """A method, not an attribute read: it changes while ``_supervise`` awaits."""
        return self._closing

    @property
    def up(self) -> bool:
        return self._transport is not None

    def request(self, exchange: Exchange, raw_target: str, headers: list[tuple[str, str]]) -> None:
        """At arrival: send the request to the shadow process, or count what it would have done as dropped."""
        serving = exchange.live.upstream if exchange.live is not None else "incumbent"
        targets = self._targets.get(serving, ())
        if not self._recording and not any(self._wants(policy, exchange) for _, policy in targets):
            return
        transport = self._transport
        if transport is None or transport.get_write_buffer_size() > self._bound:
            for name, policy in targets:
                if self._wants(policy, exchange):
                    self._metrics.child(self._metrics.mirrors_skipped, name, SHADOW_DOWN).inc()
            if self._recording:
                self._metrics.child(self._metrics.records_dropped, SHADOW_DOWN).inc()
            return
        transport.writelines(request_frame(exchange, raw_target, headers))
        if self._recording:
            exchange.on_complete = functools.partial(self._done, self._generation)

    @staticmethod
    def _wants(policy: MirrorPolicy, exchange: Exchange) -> bool:
        reason = policy.skip_reason(
            method=exchange.method, path=exchange.path, request_id=exchange.request_id, body_size=len(exchange.body)
        )
        return reason is None

    def _done(self, generation: int, exchange: Exchange) -> None:
        """The live arm ended: send its capture to the shadow process that has the request."""
        transport = self._transport
        if transport is None or generation != self._generation or transport.get_write_buffer_size() > self._bound:
            self._metrics.child(self._metrics.records_dropped, SHADOW_DOWN).inc()
            return
        transport.writelines(done_frame(exchange))

    def connected(self, transport: asyncio.Transport) -> None:
        if self._transport is not None:  # a previous process's socket still open: only the newest is used
            self._transport.abort()
        self._transport = transport
        self._generation += 1
        self._health.up()
        self._connected.set()
        log.info("shadow_process_connected", pid=self._process.pid if self._process else None)

    def lost(self, protocol: _Protocol) -> None:
        if self._owner is protocol:  # an older connection closing late changes nothing
            self._transport = None
            self._connected.clear()

    def _protocol(self) -> _Protocol:
        protocol = _Protocol(self)
        self._owner = protocol
        return protocol

    async def start(self, within: float = 30.0) -> None:
        """Listen, spawn the shadow process and wait (up to ``within``) until it connected."""
        self._dir = tempfile.mkdtemp(prefix="shadow-proxy-link-")
        path = os.path.join(self._dir, "shadow.sock")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._protocol, path)
        self._task = asyncio.create_task(self._supervise(path), name="shadow-process")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._connected.wait()
        if not self.up:
            log.warning("shadow_process_not_connected", waited=within)

    async def _supervise(self, path: str) -> None:
        """Run the shadow process; when it dies, count it and start another after a backoff."""
        from .child import main  # not at import time: the child builds a Runtime, whose module imports this one

        backoff = Backoff(0.2, 5.0)
        context = multiprocessing.get_context("spawn")
        while not self.closing():
            process = self._process = context.Process(
                target=main, args=(self._config, path, os.getpid()), name="shadow-process"
            )
            process.start()
            started = time.monotonic()
            await _exited(process)
            process.join()
            _forget_metrics(process)
            if self.closing():
                return
            if self._transport is not None and self._transport.is_closing():
                self._transport = None
            self._health.down(f"exited with code {process.exitcode}")
            self._metrics.loop_restarts.labels("shadow-process").inc()
            log.warning("shadow_process_died", pid=process.pid, exitcode=process.exitcode)
            if time.monotonic() - started > HEALTHY_AFTER:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def close(self) -> None:
        """Ask the shadow process to drain its mirrors and flush its records, then wait for it (killed past
        the drain and flush timeouts)."""
        self._closing = True
        grace = self._config.shadow.drain_timeout + self._config.record.flush_timeout + 5.0
        if self._transport is not None:
            self._transport.writelines(frame({"t": STOP}, b""))
            self._transport.close()
        process = self._process
        if process is not None and process.is_alive():
            try:
                async with asyncio.timeout(grace):
                    await _exited(process)
            except TimeoutError:
                log.warning("shadow_process_killed", pid=process.pid, waited=grace)
                process.kill()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self._dir, ignore_errors=True)


async def _exited(process: BaseProcess) -> None:
    """Wait, without a thread, until the process has ended (its sentinel becomes readable)."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    sentinel = process.sentinel

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(sentinel, readable)
    try:
        if process.is_alive():
            await ended
    finally:
        loop.remove_reader(sentinel)


def _forget_metrics(process: BaseProcess) -> None:
    """A dead shadow process's live gauges must leave the totals (its counters stay in them)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and process.pid is not None:
        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]

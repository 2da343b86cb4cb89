"""Lifecycle of one proxy process: listeners, ordered startup, graceful ordered shutdown.

Contexts are registered in ``cleanup_ctx`` order (Redis clients and the loop supervisor, upstream
sessions, canary, recorder, spend, shadow) and
torn down in reverse after aiohttp has stopped accepting and let in-flight requests finish:
mirrors drain, then the recorder flushes, then sessions close, then Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator

import structlog
import uvloop
from aiohttp import web

from . import logs
from .admin import RUNTIME, admin_app
from .canary.feedback import Feedback
from .clients import Guard, GuardedRunner
from .comparator.pricing import warm as warm_pricing
from .config import Config, split_listen
from .redis import StoreUnavailable
from .wiring import Runtime, feedback_enabled

log = structlog.get_logger("shadow_proxy.server")


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's Redis clients and its loop supervisor: the last to go."""
    runtime = app[RUNTIME]
    yield
    await runtime.supervisor.stop()
    if runtime.clients is not None:
        await runtime.clients.close()


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    for upstream in runtime.upstreams:
        await upstream.start()
    yield
    for upstream in runtime.upstreams:
        await upstream.close()


async def _canary_ctx(app: web.Application) -> AsyncIterator[None]:
    """The weight watcher (every replica) and the controller loop (the lease holder acts)."""
    canary = app[RUNTIME].canary
    if canary is None:
        yield
        return
    stop = asyncio.Event()
    supervisor = app[RUNTIME].supervisor
    if canary.weights is not None:
        with contextlib.suppress(StoreUnavailable):
            await canary.controller.current()  # creates the first stage's state if there is none
            await canary.weights.refresh()  # serve the current weight from the first request on
        canary.weights.start(supervisor)
        health = supervisor.health("canary-controller")
        supervisor.start(health.name, lambda: canary.controller.run(stop, health))
    yield
    stop.set()
    if canary.weights is not None:
        await supervisor.wait("canary-controller")
        await canary.weights.close()
    await canary.controller.close()


async def _recorder_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    if runtime.recorder is not None:
        runtime.recorder.start(runtime.supervisor)
    yield
    if runtime.recorder is not None:
        await runtime.recorder.close(runtime.config.record.flush_timeout)


async def _spend_ctx(app: web.Application) -> AsyncIterator[None]:
    """Candidates' spend shared through Redis (only when a candidate has a budget)."""
    runtime = app[RUNTIME]
    spend = runtime.spend
    if any(d.ledger is not None for d in runtime.shadows):
        # Price data and tokenizers load in a thread, before the first mirror needs them.
        await asyncio.to_thread(warm_pricing)
    if spend is not None:
        spend.start(runtime.supervisor)
    yield
    if spend is not None:
        await spend.close()


async def _shadow_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    yield
    for dispatcher in runtime.dispatchers():
        await dispatcher.drain(runtime.config.shadow.drain_timeout)


async def _link_ctx(app: web.Application) -> AsyncIterator[None]:
    """In process mode, the shadow process: started last, and first asked to drain and flush at shutdown."""
    link = app[RUNTIME].link
    if link is not None:
        await link.start()
    yield
    if link is not None:
        await link.close()


def main_app(runtime: Runtime, guard: Guard) -> web.Application:
    # The body is read by the forwarder with its own limit; aiohttp's own cap must not interfere.
    app = web.Application(client_max_size=runtime.config.limits.max_body_bytes + 1)
    app[RUNTIME] = runtime
    app.cleanup_ctx.extend([_redis_ctx, _sessions_ctx, _canary_ctx, _recorder_ctx, _spend_ctx, _shadow_ctx, _link_ctx])
    forwarder = runtime.forwarder
    if runtime.canary is not None and feedback_enabled(runtime.config):
        app.router.add_post(runtime.config.canary.feedback_path, Feedback(runtime).handle)
    app.router.add_route("*", "/{tail:.*}", guard.gated(forwarder.handle), expect_handler=forwarder.handle_expect)
    return app


class ProxyServer:
    """The main and admin listeners of one process."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        self.runtime = Runtime.build(config)
        self._reuse_port = reuse_port
        limits = config.limits
        self.guard = Guard(limits, self.runtime.metrics, config.proxy.request_id_header)
        self._runner = GuardedRunner(
            main_app(self.runtime, self.guard),
            self.guard,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=config.proxy.shutdown_timeout,
            keepalive_timeout=config.proxy.keepalive_timeout,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
        )
        self._admin_runner = web.AppRunner(admin_app(self.runtime), handle_signals=False, access_log=None)
        self.port = 0
        self.admin_port = 0

    async def start(self) -> None:
        """Start the parts and bind both listeners; what fails (a port that cannot be bound, a spool
        directory that cannot be used) is raised after everything already started is cleaned up."""
        try:
            await self._runner.setup()
            await self._admin_runner.setup()
            await self._bind()
        except BaseException:
            await self._runner.cleanup()
            await self._admin_runner.cleanup()
            raise

    async def _bind(self) -> None:
        host, port = split_listen(self.config.proxy.listen)
        site = web.TCPSite(self._runner, host, port, reuse_port=self._reuse_port, backlog=1024)
        await site.start()
        admin_host, admin_port = split_listen(self.config.admin.listen)
        admin_site = web.TCPSite(self._admin_runner, admin_host, admin_port, reuse_port=self._reuse_port)
        await admin_site.start()
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise pause the event loop for tens of milliseconds under load.
        gc.collect()
        gc.freeze()
        self.port = self._runner.addresses[0][1]
        self.admin_port = self._admin_runner.addresses[0][1]
        log.info(
            "proxy_listening",
            listen=f"{host}:{self.port}",
            admin=f"{admin_host}:{self.admin_port}",
            incumbent=self.config.incumbent.url,
            candidates={c.name: c.url for c in self.config.candidate} or None,
            recording=self.config.record.enabled,
        )

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, drain mirrors, flush records, close pools."""
        self.runtime.shutting_down = True
        log.info("proxy_stopping")
        await self._runner.cleanup()
        await self._admin_runner.cleanup()
        log.info("proxy_stopped")


async def serve_until_signal(config: Config, *, reuse_port: bool = False) -> None:
    """Run one process until SIGTERM or SIGINT, then shut down in order."""
    server = ProxyServer(config, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()


def worker_main(config: Config) -> None:
    """Entry point of one spawned worker process (importable by name, as spawn requires)."""
    logs.configure(config.proxy.log_level, config.proxy.log_format)
    uvloop.run(serve_until_signal(config, reuse_port=config.proxy.workers > 1))

"""Slow and greedy clients: the main listener's connection protocol, its watchdog and its caps.

Each connection has at most one timer handle, moved forward rather than replaced, in the spirit of
Apache's mod_reqtimeout: a request's headers must be complete within ``limits.header_timeout`` of its
first byte (or of the connection opening), else 408 and close; its body must keep coming, within
``limits.body_timeout`` plus one second per ``limits.body_min_rate`` bytes received, else the reader
gets ``BodyTimeout`` (the forwarder answers 408). Over ``limits.max_connections`` a new connection is
answered 503 with ``Retry-After`` and closed before anything is parsed; over ``limits.max_in_flight``
a request is answered the same way. Malformed requests get a JSON 400 and one rate-limited warning
line, never aiohttp's traceback (a body that breaks after the headers included: aiohttp would leave its
reader waiting). Nothing here adds a task, and per request only counters move.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from .config import LimitsConfig
from .forwarding import BodyAborted, error_response, new_request_id
from .metrics import Metrics

log = structlog.get_logger("shadow_proxy.clients")

RETRY_AFTER = "1"
LOG_INTERVAL = 10.0  # seconds between two warnings of one kind; the next one says how many were suppressed
_IDLE, _HEADERS, _BODY = 0, 1, 2

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Throttled:
    """Warnings about clients, at most one per kind per interval, each with the count it stands for."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, kind: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        log.warning(event, kind=kind, suppressed=self._suppressed.pop(kind, 0), **fields)


@dataclass(slots=True)
class Guard:
    """What every connection of the main listener shares: the limits, the counters, the open count."""

    limits: LimitsConfig
    metrics: Metrics
    request_id_header: str
    warnings: Throttled = field(default_factory=Throttled)
    connections: int = 0
    in_flight: int = 0

    def gated(self, handler: Handler) -> Handler:
        """The handler behind the in-flight cap (a counter, no semaphore: over the cap is refused, not queued)."""

        async def gate(request: web.Request) -> web.StreamResponse:
            if self.in_flight >= self.limits.max_in_flight:
                return self._over_capacity(request)
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        return gate

    def _over_capacity(self, request: web.Request) -> web.Response:
        self.metrics.rejected.labels("over_capacity").inc()
        self.warnings.warning("request_rejected", "over_capacity", limit=self.limits.max_in_flight)
        request_id = request.headers.get(self.request_id_header) or new_request_id()
        message = f"the proxy is at its limit of {self.limits.max_in_flight} requests in flight: retry shortly"
        response = error_response(503, "overloaded", message, request_id, self.request_id_header)
        response.headers["Retry-After"] = RETRY_AFTER
        return response


def raw_error(status: int, reason: str, error: str, message: str, *, retry_after: bool = False) -> bytes:
    """A whole HTTP/1.1 error response with a JSON body, for a connection that has no request object."""
    body = orjson.dumps({"error": {"message": message, "type": error, "code": status}})
    extra = f"Retry-After: {RETRY_AFTER}\r\n" if retry_after else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedServer(web.Server):
    """aiohttp's low-level server making ``GuardedHandler`` protocols."""

    def __init__(self, server: web.Server, guard: Guard) -> None:
        # Rebuilt from the server AppRunner made, with the same handler, factory and handler arguments.
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections are guarded (the protocol factory is the only change)."""

    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.guard)


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol with the watchdog, the connection cap and JSON protocol errors."""

    __slots__ = ("_guard", "_phase", "_timer", "_deadline", "_since", "_received", "_payload", "_refused", "_spoke")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._phase = _IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._since = 0.0
        self._received = 0
        self._payload: StreamReader | None = None
        self._refused: asyncio.Transport | None = None
        self._spoke = False  # any byte received on this connection yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.connections >= guard.limits.max_connections:
            self._refuse(transport)  # type: ignore[arg-type]
            return
        guard.connections += 1
        guard.metrics.client_connections.inc()
        super().connection_made(transport)
        self._watch_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refused is None:
            self._guard.connections -= 1
            self._guard.metrics.client_connections.dec()
        self._refused = None
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Over the cap: answer 503 at once and half-close; what the client sends is read and dropped until
        it closes (closing with unread data would reset the connection and could lose the answer)."""
        self._refused = transport
        self._guard.metrics.connections_closed.labels("max_connections").inc()
        self._guard.warnings.warning("connection_refused", "max_connections", limit=self._guard.limits.max_connections)
        message = f"the proxy is at its limit of {self._guard.limits.max_connections} connections: retry shortly"
        transport.write(raw_error(503, "Service Unavailable", "overloaded", message, retry_after=True))
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._loop.call_later(self._guard.limits.header_timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        self._spoke = True
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            if self._phase == _BODY:
                self._body_broken()
            self._headers_complete()
        elif self._phase == _BODY:
            assert self._payload is not None
            if self._payload.is_eof():
                self._watch_headers()  # the next pipelined request has begun
            else:
                self._received += len(data)
        elif self._phase == _IDLE and data:
            self._watch_headers()

    def _body_broken(self) -> None:
        """A parse error in a body being read (a bad chunk size): aiohttp queues a 400 for later but leaves the
        reader of the body waiting for ever; the reader gets the error instead."""
        assert self._payload is not None
        error = self._messages[-1][0] if self._messages else None
        if self._payload.is_eof() or not isinstance(error, _ErrInfo):
            return
        self._guard.metrics.rejected.labels("malformed").inc()
        self._guard.warnings.warning("request_malformed", type(error.exc).__name__, detail=error.message[:200])
        self._payload.set_exception(BodyAborted(400, "bad_request", f"malformed request body: {error.message[:200]}"))

    def _headers_complete(self) -> None:
        payload = self._messages[-1][1] if self._messages else None
        if payload is None or payload.is_eof():
            self._phase = _IDLE
            return
        self._phase, self._payload, self._received = _BODY, payload, 0
        self._since = self._loop.time()
        self._arm(self._since + self._guard.limits.body_timeout)

    def _watch_headers(self) -> None:
        self._phase = _HEADERS
        self._arm(self._loop.time() + self._guard.limits.header_timeout)

    def _arm(self, deadline: float) -> None:
        """Keep the one timer: an earlier one fires, finds the later deadline and moves itself there."""
        self._deadline = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expired)
        elif self._timer.when() > deadline:
            self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._phase == _IDLE or self.transport is None:
            return
        now = self._loop.time()
        if self._phase == _BODY:
            assert self._payload is not None
            if self._payload.is_eof():
                self._phase = _IDLE
                return
            rate = self._guard.limits.body_min_rate
            self._deadline = self._since + self._guard.limits.body_timeout + (self._received / rate if rate else 0)
        elif self._request_in_progress:
            # Headers of a pipelined request trickling behind a response still streaming: judged once it ends.
            self._deadline = max(self._deadline, now + self._guard.limits.header_timeout)
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._expired)
        elif self._phase == _HEADERS:
            self._headers_too_slow()
        else:
            self._body_too_slow()

    def _headers_too_slow(self) -> None:
        limits = self._guard.limits
        if not self._spoke:
            # Opened and never used (a client's spare pooled connection): closed without a word, like an idle
            # keep-alive connection. A 408 here could cross a request the client sends at that moment on this
            # connection, which would then read the 408 as its own answer.
            self._guard.metrics.connections_closed.labels("idle_timeout").inc()
            self.force_close()
            return
        self._guard.metrics.connections_closed.labels("header_timeout").inc()
        self._guard.warnings.warning("connection_closed", "header_timeout", limit=limits.header_timeout)
        message = f"request headers not complete within {limits.header_timeout:g} s"
        assert self.transport is not None
        self.transport.write(raw_error(408, "Request Timeout", "request_timeout", message))
        self.force_close()

    def _body_too_slow(self) -> None:
        limits = self._guard.limits
        self._phase = _IDLE
        self._guard.metrics.rejected.labels("body_timeout").inc()
        self._guard.warnings.warning("request_rejected", "body_timeout", received=self._received)
        assert self._payload is not None
        self._payload.set_exception(
            BodyAborted(
                408,
                "request_timeout",
                f"request body too slow: {self._received} bytes in {self._loop.time() - self._since:.1f} s "
                f"(at least {limits.body_min_rate} bytes/s after the first {limits.body_timeout:g} s)",
            )
        )
        self._payload = None

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's error answer, as a JSON error and one throttled log line instead of a traceback."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun, no error can be sent")
        guard = self._guard
        if status == 400:
            guard.metrics.rejected.labels("malformed").inc()
            detail = message or str(exc) or "malformed request"
            guard.warnings.warning("request_malformed", type(exc).__name__, detail=detail[:200])
            kind, text = "bad_request", f"malformed request: {detail[:200]}"
        else:
            log.error("request_failed", status=status, exc_info=exc)
            kind, text = ("timeout", "request timed out") if status == 504 else ("internal_error", "internal error")
        response = error_response(status, kind, text, new_request_id(), guard.request_id_header)
        response.force_close()
        return response

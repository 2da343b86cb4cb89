"""The hot path: read the request, start the mirror beside it, relay the incumbent's stream back.

Nothing here waits on the candidate, the recorder or Redis: the mirror is a task owned by the
shadow dispatcher, and the recorder receives the exchange through a synchronous, bounded hand-off
when the last arm has ended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import orjson
import structlog
from aiohttp import web

from .canary import tokens
from .exchange import ArmCapture, Exchange, now
from .headers import relayed_headers, request_headers
from .http1 import Response
from .metrics import Metrics
from .recorder import Recorder
from .routing import RouteTable, serves_candidate, sticky_key
from .shadow import ShadowDispatcher
from .upstream import SEND_ERRORS, Failure, Upstream, classify

log = structlog.get_logger("shadow_proxy.forwarding")

_SCHEME_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


class BodyAborted(TimeoutError):
    """Set on a request's payload by the connection watchdog (clients.py): the body stopped coming (408) or
    broke after the headers (400). A TimeoutError only so that aiohttp's lingering read of the rest of an
    unread body swallows it quietly instead of logging a traceback."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class _Relayed(web.StreamResponse):
    """The upstream's answer as it came: aiohttp adds ``Content-Type: application/octet-stream`` to a body
    without one, which would invent a type the upstream never stated."""

    typed = True
    # The head waits for the first chunk and leaves with it in one write (one system call, one packet) when
    # that chunk is already here; ``_relay`` sends it alone at once when it is not (a stream's first event).
    _send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if not self.typed:
            self.headers.popall("Content-Type", None)


@dataclass(frozen=True, slots=True)
class ServingArm:
    """The upstream that answers the client, and where the same request is mirrored."""

    upstream: Upstream
    mirrors: tuple[ShadowDispatcher, ...]


class WeightSource(Protocol):
    weight: float


class MirrorLink(Protocol):
    """Where a request goes for its mirrors and record when they run in a shadow process (``isolation/link.py``)."""

    def request(self, exchange: Exchange, raw_target: str, headers: list[tuple[str, str]]) -> None: ...


@dataclass(frozen=True, slots=True)
class CanaryRouting:
    """Sticky, weighted choice of the serving arm (the weight is kept current by a watcher)."""

    weights: WeightSource
    sticky_keys: tuple[str, ...]
    served_by_header: str

    def serving(self, request: web.Request, request_id: str) -> str:
        weight = self.weights.weight
        if weight <= 0.0:
            return "incumbent"
        key = sticky_key(self.sticky_keys, request.headers, request.cookies, request.remote or "", request_id)
        return "candidate" if serves_candidate(key, weight) else "incumbent"


@dataclass(frozen=True, slots=True)
class Forwarder:
    """Everything the live path needs, built once at startup."""

    incumbent: ServingArm
    candidate_live: ServingArm | None
    canary: CanaryRouting | None
    noise: ShadowDispatcher | None
    recorder: Recorder | None
    metrics: Metrics
    routes: RouteTable
    request_id_header: str
    via: str
    max_body_bytes: int
    record_cap: int
    # While feedback is on, every answer carries the token that lets its receiver send feedback for it.
    feedback_tokens: tokens.FeedbackTokens | None = None
    # shadow.isolation = "process": mirrors and records are the shadow process's; this hands requests over.
    link: MirrorLink | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The single route of the main listener: every method, every path."""
        # The record's key and the sampling hash are ours, never the client's: a client cannot merge two
        # requests into one record or pick ids that are never mirrored. Its own id is kept and echoed.
        record_id = new_request_id()
        client_id = request.headers.get(self.request_id_header)
        request_id = client_id or record_id
        structlog.contextvars.bind_contextvars(request_id=request_id, record_id=record_id)
        try:
            body = await read_body(request, self.max_body_bytes)
        except BodyAborted as exc:  # counted and logged by the watchdog that set it
            aborted = error_response(exc.status, exc.error, str(exc), request_id, self.request_id_header)
            aborted.force_close()
            return aborted
        except web.RequestPayloadError as exc:  # a bad chunk after the headers: the 400 of a malformed request
            return request.protocol.handle_error(request, 400, exc, str(exc))
        if body is None:
            self.metrics.rejected.labels("body_too_large").inc()
            log.warning("request_rejected", reason="body_too_large", limit=self.max_body_bytes)
            return error_response(
                413,
                "request_too_large",
                f"request body exceeds {self.max_body_bytes} bytes",
                request_id,
                self.request_id_header,
            )
        serving = self.canary.serving(request, record_id) if self.canary is not None else "incumbent"
        arm = self.candidate_live if serving == "candidate" and self.candidate_live is not None else self.incumbent
        raw_target = origin_form(request.raw_path)
        exchange = self._exchange(request, raw_target, record_id, body, arm.upstream)
        exchange.client_request_id = client_id
        headers = request_headers(
            request.headers.items(),
            client_ip=request.remote or "",
            scheme=request.scheme,
            host=request.host,
            via=self.via,
            request_id_header=self.request_id_header,
            request_id=request_id,
        )
        try:
            response = await self._relay(request, exchange, raw_target, headers, arm)
            if not response.prepared:
                self._label(response, arm.upstream, record_id)
            return response
        finally:
            exchange.arm_done()

    async def handle_expect(self, request: web.Request) -> web.StreamResponse | None:
        """Answer ``Expect: 100-continue``, refusing an announced oversize body before it is sent."""
        request_id = request.headers.get(self.request_id_header) or new_request_id()
        if request.headers.get("Expect", "").lower() != "100-continue":
            self.metrics.rejected.labels("bad_expect").inc()
            return error_response(
                417, "expectation_failed", "only Expect: 100-continue is supported", request_id, self.request_id_header
            )
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            self.metrics.rejected.labels("body_too_large").inc()
            response = error_response(
                413,
                "request_too_large",
                f"request body exceeds {self.max_body_bytes} bytes",
                request_id,
                self.request_id_header,
            )
            # The client waits for our word before uploading: answer, then close rather than
            # linger for a body that will not come.
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
            return response
        if request.version >= aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    def _label(self, response: web.StreamResponse, upstream: Upstream, record_id: str) -> None:
        """The headers about the canary: which arm served (when configured) and the feedback token, which
        names the proxy's own record id (never the client's x-request-id, which anyone can reuse)."""
        if self.canary is not None and self.canary.served_by_header:
            response.headers[self.canary.served_by_header] = upstream.name
        if self.feedback_tokens is not None:
            response.headers[tokens.HEADER] = self.feedback_tokens.issue(record_id)

    def _exchange(
        self, request: web.Request, raw_target: str, request_id: str, body: bytes, upstream: Upstream
    ) -> Exchange:
        path, _, query = raw_target.partition("?")
        exchange = Exchange(
            request_id=request_id,
            method=request.method,
            path=path,
            query=query,
            route=self.routes.match(request.path) or "other",
            headers=list(request.headers.items()),
            client_ip=request.remote or "",
            received_wall=time.time(),
            received=now(),
            body=body,
            on_complete=self.recorder.submit if self.recorder is not None else None,
        )
        exchange.live = ArmCapture(upstream.name, "live", self.record_cap)
        exchange.expect_arm()
        return exchange

    def _mirror(
        self,
        exchange: Exchange,
        raw_target: str,
        headers: list[tuple[str, str]],
        mirrors: tuple[ShadowDispatcher, ...],
    ) -> None:
        """Start every mirror this request is due (each target decides, counts and notes its skips)."""
        if self.link is not None:
            self.link.request(exchange, raw_target, headers)
            return
        for mirror in mirrors:
            arm = mirror.dispatch(exchange, raw_target, headers)
            if arm is not None:
                exchange.shadows.append(arm)
        # The A/A copy measures the incumbent's own run-to-run noise, on the same kind of requests.
        if self.noise is not None:
            exchange.noise = self.noise.dispatch(exchange, raw_target, headers)

    async def _relay(
        self,
        request: web.Request,
        exchange: Exchange,
        raw_target: str,
        headers: list[tuple[str, str]],
        arm: ServingArm,
    ) -> web.StreamResponse:
        live = exchange.live
        assert live is not None
        upstream = arm.upstream
        live.start = now()
        upstream_response: Response | None = None
        body, sent_headers = exchange.body, headers
        if not upstream.shaping.idle:
            shaped = upstream.shaping.apply(body, headers)
            body, sent_headers, live.model = shaped.body, shaped.headers, shaped.model
        try:
            try:
                # The live request is written first; the mirrors start while the incumbent works on it.
                pending = upstream.begin(request.method, raw_target, sent_headers, body)
                try:
                    self._mirror(exchange, raw_target, headers, arm.mirrors)
                finally:
                    upstream_response = await pending
            except SEND_ERRORS as exc:
                return self._failed(exchange, classify(exc))
            live.on_headers(upstream_response.status, upstream_response.headers, now())
            response = _Relayed(status=upstream_response.status, reason=upstream_response.reason or None)
            relayed, via, response.typed = relayed_headers(upstream_response.headers, self.via)
            response.headers.extend(relayed)
            response.headers["Via"] = via
            response.headers[self.request_id_header] = exchange.client_request_id or exchange.request_id
            self._label(response, upstream, exchange.request_id)
            try:
                await response.prepare(request)
                if not upstream_response.body_ready:
                    await response.write(b"")  # nothing to send the head with: send it now
            except ConnectionError:
                self._client_gone(exchange, live)
                return response
            await self._stream(request, exchange, upstream_response, response)
            return response
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client disconnects: the incumbent request is
            # released unfinished below, which closes its connection.
            self._client_gone(exchange, live)
            raise
        finally:
            if upstream_response is not None:
                # Back to the pool when read to the end (it went back already); closed otherwise.
                upstream_response.release()
            self._account(exchange, live)

    async def _stream(
        self,
        request: web.Request,
        exchange: Exchange,
        upstream_response: Response,
        response: web.StreamResponse,
    ) -> None:
        live = exchange.live
        assert live is not None
        while True:
            try:
                chunk = await upstream_response.readany()
            except SEND_ERRORS as exc:
                failure = classify(exc)
                live.finish(now(), failure.error)
                log.warning("upstream_failed_mid_stream", error=failure.error, detail=failure.detail)
                # Headers are gone already: cut the connection so the client sees a truncated body.
                if request.transport is not None:
                    request.transport.abort()
                return
            if not chunk:
                break
            live.on_chunk(chunk, now())
            try:
                await response.write(chunk)
            except ConnectionError:
                self._client_gone(exchange, live)
                return
        await response.write_eof()
        live.finish(now())

    def _client_gone(self, exchange: Exchange, live: ArmCapture) -> None:
        exchange.client_disconnected = True
        live.finish(now(), "client_disconnected")
        self.metrics.client_disconnects.inc()
        log.info("client_disconnected", phase="waiting" if live.first_byte is None else "streaming")

    def _failed(self, exchange: Exchange, failure: Failure) -> web.Response:
        assert exchange.live is not None
        exchange.live.finish(now(), failure.error)
        exchange.response_status = failure.status
        upstream = exchange.live.upstream
        log.warning("upstream_failed", upstream=upstream, error=failure.error, detail=failure.detail)
        return error_response(
            failure.status,
            failure.error,
            f"{upstream} upstream failed: {failure.detail}",
            exchange.client_request_id or exchange.request_id,
            self.request_id_header,
        )

    def _account(self, exchange: Exchange, live: ArmCapture) -> None:
        code = live.status if exchange.response_status is None else exchange.response_status
        metrics = self.metrics
        metrics.child(metrics.requests, live.upstream, exchange.route, str(code or 0)).inc()
        if live.start:
            metrics.overhead.observe(live.start - exchange.received)
        if live.error is not None:
            metrics.child(metrics.upstream_errors, live.upstream, "live", live.error).inc()
        elif live.end is not None:
            metrics.child(metrics.upstream_latency, live.upstream, "live").observe(live.end - live.start)
        if not log.is_enabled_for(logging.DEBUG):
            return  # the fields below cost more to build than the (filtered) call itself
        log.debug(
            "request_proxied",
            method=exchange.method,
            path=exchange.path,
            status=code,
            error=live.error,
            duration_ms=None if live.end is None else round((live.end - exchange.received) * 1000, 3),
            mirrored=[arm.upstream for arm in exchange.shadows],
            shadow_skipped=exchange.shadow_skipped or None,
        )


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole request body (chunked included), or None when it is larger than the limit."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    if not request.body_exists:
        return b""
    content = request.content
    chunks: list[bytes] = []
    total = 0
    while chunk := await content.readany():  # iter_any() without an async iterator object per request
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def origin_form(raw_target: str) -> str:
    """The path and query of a request target: an absolute-form one (``GET http://host:port/v1/x``, RFC 9112
    §3.2.2, what clients send to a proxy) loses its scheme and authority, byte for byte otherwise."""
    if raw_target.startswith("/"):
        return raw_target
    rest = _SCHEME_AUTHORITY.sub("", raw_target, count=1)
    return rest if rest.startswith("/") else "/" + rest


class _RandomHex:
    """Random hex digits from os.urandom, read 4 KiB at a time: one getrandom() system call per 409 ids instead of
    one per id (several us each here), with the same randomness. Refilled in a forked child, which must not
    reuse its parent's bytes."""

    _BATCH = 4096

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._hex, self._at = "", 0

    def take(self, digits: int) -> str:
        at = self._at
        if at + digits > len(self._hex):
            self._hex, at = os.urandom(self._BATCH).hex(), 0
        self._at = at + digits
        return self._hex[at : at + digits]


_random_hex = _RandomHex()


def new_request_id() -> str:
    """A unique id that sorts by time: 48 bits of Unix milliseconds then 80 random bits (UUIDv7's layout), hex."""
    return f"{int(time.time() * 1000):012x}{_random_hex.take(20)}"


def error_response(status: int, error: str, message: str, request_id: str, request_id_header: str) -> web.Response:
    """A JSON error in the OpenAI-compatible shape, so SDK clients surface the message."""
    body = {"error": {"message": message, "type": error, "code": status, "request_id": request_id}}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={request_id_header: request_id},
    )

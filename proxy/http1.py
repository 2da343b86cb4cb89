"""A small HTTP/1.1 client for the upstreams, on asyncio protocols and httptools' parser (llhttp).

Why not aiohttp's client: per request it builds a ``ClientRequest`` (URL, header normalisation, a payload
object), goes through the connector, arms its timers and starts a task to send the body, which measured
170 to 190 us of CPU per request on loopback against 50 us for this client (docs/performance.md). A
reverse proxy needs a small part of it: one origin, keep-alive, a body already in memory, a streamed
answer, three timeouts and precise failure classes. What it does:

- **Pool**: at most ``limit`` connections per upstream (idle ones reused last-in first-out; one idle for
  ``keepalive`` seconds or more is closed when next found instead of reused); a request beyond the limit
  waits for a connection (in arrival order, though a newcomer may take a connection freed meanwhile).
- **Request**: the head and the body in one write, with ``Host`` and (for a body or POST/PUT/PATCH) a
  ``Content-Length``; nothing else is added (no ``Accept``, ``User-Agent`` or ``Accept-Encoding``).
- **Answer**: ``send`` returns once the status line and headers arrived; the body is read with
  ``readany`` as it comes, de-chunked, never decompressed. Reading pauses the socket while more than
  ``BUFFER_HIGH`` bytes wait unread. Informational (1xx) answers are skipped; a HEAD answer has no body.
- **Timeouts**: ``connect`` (TCP and TLS handshake), ``read`` (the longest silence while waiting for the
  answer, reset by every read, as aiohttp's ``sock_read``; not while the reader is behind), ``total`` (0:
  none). One watchdog timer per pool checks the requests in progress every ``WATCHDOG_TICK`` seconds (or a
  quarter of the shortest timeout), so a read or total timeout fires up to that late; no timer per request.
- **Failures** raise ``UpstreamError`` subclasses whose ``error`` is the class the proxy reports.
- **Bounds**: the status line and headers of an answer at most ``MAX_HEAD_BYTES``, at most
  ``MAX_HEADERS`` fields (``bad_response`` beyond).

A connection goes back to the pool only when its answer was read to the end and both sides allow
keep-alive; an answer released unfinished closes its connection.
"""

from __future__ import annotations

import asyncio
import collections
import math
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

import httptools

BUFFER_HIGH = 256 * 1024  # unread body bytes above which the socket stops being read
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256
KEEPALIVE = 15.0  # seconds an idle connection is kept (aiohttp's default)
WATCHDOG_TICK = 1.0  # timeouts are checked this often (or a quarter of the shortest timeout): that late at most
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """An upstream request failed; ``error`` names how (a metric label), ``timeout`` whether it timed out."""

    error = "client_error"
    timeout = False


class ConnectError(UpstreamError):
    error = "connect_error"


class ConnectTimeout(UpstreamError):
    error = "connect_timeout"
    timeout = True


class ReadTimeout(UpstreamError):
    error = "read_timeout"
    timeout = True


class TotalTimeout(UpstreamError):
    error = "timeout"
    timeout = True


class Disconnected(UpstreamError):
    error = "disconnected"


class PayloadError(UpstreamError):
    error = "payload_error"


class BadResponse(UpstreamError):
    error = "bad_response"


class Response:
    """An answer whose head has arrived; its body is read with ``readany`` until it returns b""."""

    __slots__ = ("_chunks", "_conn", "_eof", "_error", "_waiter", "buffered", "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.buffered = 0  # body bytes received and not yet read
        self._conn: _Connection | None = conn  # None once the answer ended (the connection may serve another)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: str) -> str | None:
        """The first value of a header (name compared case-insensitively), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def body_ready(self) -> bool:
        """Whether some body, its end or its failure has arrived already (``readany`` will not wait)."""
        return bool(self._chunks) or self._eof or self._error is not None

    async def readany(self) -> bytes:
        """The body received so far and not yet read (waiting for some if none), b"" at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._pop_all())
        self.buffered -= len(chunk)
        conn = self._conn
        if conn is not None and conn.paused and self.buffered < BUFFER_HIGH // 2:
            conn.resume()
        return chunk

    def _pop_all(self) -> list[bytes]:
        chunks = list(self._chunks)
        self._chunks.clear()
        return chunks

    def release(self) -> None:
        """Done with the answer: an unfinished one closes its connection (a finished one went back already)."""
        conn, self._conn = self._conn, None
        self._chunks.clear()
        if conn is not None:
            conn.abort()

    # Called by the connection.
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def _end(self, error: UpstreamError | None = None) -> None:
        self._conn = None
        if error is None:
            self._eof = True
        elif not self._eof and self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: it parses one answer at a time and feeds its body to the ``Response``."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self._parser: Any = None
        self._method = ""
        self._head: asyncio.Future[Response] | None = None  # until the head of the answer arrived
        self._response: Response | None = None  # from the head to the end of the body
        self._status = 0
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_received = 0  # bytes read while the head is incomplete (what the parser may be holding)
        self._keep_alive = False
        self._until_eof = False  # a body without length or chunking: it ends when the connection does
        self._last_read = 0.0
        self._total_deadline = math.inf

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._parser is None or (self._head is None and self._response is None):
            self.abort()  # bytes nobody asked for (an idle connection): it is unusable
            return
        self._last_read = self.pool.loop.time()
        if self._head is not None:
            self._head_received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the upstream switched protocols, which the proxy never asked for"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid HTTP answer: {exc}"))
        except UpstreamError as exc:  # raised by a callback (a bound)
            self._fail(exc)
        # on_header sees a field only once it ended: a status line or a field that never ends is bounded here.
        if self._head is not None and self._head_received > MAX_HEAD_BYTES:
            self._fail(BadResponse(f"answer head exceeds {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.pool.forget(self)
        if self._head is not None:
            self._fail(Disconnected("the upstream closed the connection before answering"))
        elif self._response is not None:
            if self._until_eof and exc is None:
                self._finish()
            else:
                self._fail(PayloadError("the upstream closed the connection before the end of the body"))
        self.pool.unwatch(self)

    # httptools callbacks
    def on_status(self, reason: bytes) -> None:
        self._reason += reason.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES or len(self._headers) >= MAX_HEADERS:
            raise BadResponse(f"answer headers exceed {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields")
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if self._head is None or parser is None:
            raise BadResponse("an answer nobody asked for")
        status = parser.get_status_code()
        if status < 200:  # 1xx: informational, the real answer follows
            self._reason, self._headers, self._head_bytes, self._head_received = "", [], 0, 0
            return
        self._keep_alive = parser.should_keep_alive()
        response = Response(self, status, self._reason, self._headers)
        self._response = response
        if self._method != "HEAD" and status not in (204, 304):
            self._until_eof = not any(
                key.lower() in ("content-length", "transfer-encoding") for key, _ in self._headers
            )
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)
        if self._method == "HEAD":
            # llhttp would wait for Content-Length bytes: the answer ends here, and the next one gets a new parser.
            self._parser = None
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)
            if self._response.buffered > BUFFER_HIGH and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._response is None:  # the end of a 1xx answer
            return
        self._finish()  # the parser stays: llhttp starts over for the next answer on this connection

    # the pool's side
    def start(self, method: str, data: list[bytes], total: float) -> asyncio.Future[Response]:
        """Send a request; the future has the answer once its head arrived."""
        assert self.transport is not None
        pool = self.pool
        if self._parser is None:
            self._parser = httptools.HttpResponseParser(self)
        self._method = method
        self._status, self._reason, self._headers, self._head_bytes, self._head_received = 0, "", [], 0, 0
        self._until_eof = False
        self._head = head = pool.loop.create_future()
        self._last_read = now = pool.loop.time()
        self._total_deadline = now + total if total > 0 else math.inf
        pool.watch(self)
        self.transport.writelines(data)
        return head

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            self._last_read = self.pool.loop.time()

    def abort(self) -> None:
        """Close at once (an answer left unread, a failure): the connection is never reused."""
        self._parser = None
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def expired(self, now: float) -> UpstreamError | None:
        """The timeout this request has passed at ``now``, if any (the pool's watchdog asks)."""
        if self.paused:  # the reader is behind, not the upstream: silence does not count
            self._last_read = now
        elif now >= self._last_read + self.pool.read_timeout:
            return ReadTimeout(f"no data from the upstream for {self.pool.read_timeout:g} s")
        if now >= self._total_deadline:
            return TotalTimeout("the upstream request exceeded its total timeout")
        return None

    def _finish(self) -> None:
        """The answer ended well: the body's end goes to the reader, the connection back to the pool."""
        self.pool.unwatch(self)
        response, self._response = self._response, None
        if response is not None:
            response._end()
        if self._keep_alive and not self._until_eof and not self.closed:
            if self.paused:  # the last read paused the socket: the answer is all in, the idle connection must read
                self.resume()
            self.pool.put_back(self)
        else:
            self.abort()

    def _fail(self, error: UpstreamError) -> None:
        self.pool.unwatch(self)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response, self._response = self._response, None
        if response is not None:
            response._end(error)
        self.abort()


def _request_bytes(
    method: str, target: str, authority: str, headers: list[tuple[str, str]], body: bytes
) -> list[bytes]:
    """The request as written: head (Host, the headers, Content-Length when there is a body or the method has
    one) and body."""
    fields = "\r\n".join(map(": ".join, headers))  # C loops: a tuple of two strings joins as "name: value"
    length = f"Content-Length: {len(body)}\r\n" if body or method in _BODY_METHODS else ""
    sep = "\r\n" if fields else ""
    head = f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n{fields}{sep}{length}\r\n".encode(
        "utf-8", "surrogateescape"
    )
    return [head, body] if body else [head]


async def _head(conn: _Connection, head: asyncio.Future[Response]) -> Response:
    """The answer's head; a request cancelled or failed before it spoils its connection, which is closed."""
    try:
        return await head
    except BaseException:
        conn.abort()
        raise


class Pool:
    """The connections to one origin, at most ``limit`` of them, with the request's timeouts."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        total_timeout: float = 0.0,
        keepalive: float = KEEPALIVE,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.on_wait = on_wait  # called when a request has to wait for a connection (the pool is at its limit)
        self.port = port
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.keepalive = keepalive
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        default_port = 443 if tls else 80
        host_text = f"[{host}]" if ":" in host else host
        self.authority = host_text if port == default_port else f"{host_text}:{port}"
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Requests in progress, checked for their timeouts by one watchdog timer per pool rather than two
        # timers per request (a uvloop timer is a libuv handle: allocated, started, stopped, freed).
        self._busy: set[_Connection] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        timeouts = [read_timeout, *([total_timeout] if total_timeout > 0 else [])]
        self.tick = min(WATCHDOG_TICK, min(timeouts) / 4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def send(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        """Send a request (``target`` in origin form, headers without Host or Content-Length) and return the
        answer once its head arrived. The caller reads it and calls ``release``."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._closed:
            raise ConnectError("the upstream's client is closed")
        data = _request_bytes(method, target, self.authority, headers, body)
        conn = await self._acquire()
        return await _head(conn, conn.start(method, data, self.total_timeout))

    def begin(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> Coroutine[Any, Any, Response]:
        """``send``, with the request written before this returns when a connection is idle (the usual case):
        the caller can do other work while the upstream answers, then await the answer's head."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        conn = None if self._closed else self._idle_connection(self.loop.time())
        if conn is None:
            return self.send(method, target, headers, body)
        data = _request_bytes(method, target, self.authority, headers, body)
        return _head(conn, conn.start(method, data, self.total_timeout))

    def _idle_connection(self, now: float) -> _Connection | None:
        """The most recently used idle connection that is still open and fresh (stale ones are closed)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive:
                return conn
            conn.abort()
        return None

    async def _acquire(self) -> _Connection:
        idle = self._idle
        conn = self._idle_connection(self.loop.time())
        if conn is not None:
            return conn
        if self._open >= self.limit and self.on_wait is not None:
            self.on_wait()
        while self._open >= self.limit:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake_one()  # we were woken but leave: the next one may go
                raise
            if idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn
                conn.abort()
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"connecting to {self.authority} took more than {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.authority}: {exc.strerror or exc}") from exc
        return conn

    def watch(self, conn: _Connection) -> None:
        self._busy.add(conn)
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.tick, self._check_timeouts)

    def unwatch(self, conn: _Connection) -> None:
        self._busy.discard(conn)

    def _check_timeouts(self) -> None:
        self._watchdog = None
        now = self.loop.time()
        for conn in list(self._busy):
            error = conn.expired(now)
            if error is not None:
                conn._fail(error)
        if self._busy:
            self._watchdog = self.loop.call_later(self.tick, self._check_timeouts)

    def put_back(self, conn: _Connection) -> None:
        """An answer ended on a reusable connection: idle, or straight to a waiting request."""
        if self._closed:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        """A connection was lost (closed by either side)."""
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every idle connection; answers in progress end with their own connection."""
        self._closed = True
        if self._watchdog is not None and not self._busy:
            self._watchdog.cancel()
            self._watchdog = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectError("the upstream's client is closed"))
        self._waiters.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

"""proxy/http1.py against real loopback servers that write exact bytes: the wire, bodies, failures, the pool.

Every scenario is an ``async def test_*`` without fixtures, run on the default asyncio loop by pytest-asyncio
and once more on uvloop (the loop the proxy runs on) by ``test_on_uvloop`` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy import http1
from proxy.config import UpstreamConfig
from proxy.http1 import BUFFER_HIGH, MAX_HEAD_BYTES, MAX_HEADERS, Pool, Response
from proxy.tools.embedded_redis import free_port
from proxy.upstream import Upstream, classify

from .conftest import eventually

SOCKET_READ = 256 * 1024  # the most one socket read adds to a response's buffer (asyncio and uvloop)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Peer:
    """The server's side of one accepted connection."""

    def __init__(
        self, server: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.index = index  # 0 for the first connection accepted, 1 for the next...
        self.reader = reader
        self.writer = writer

    async def request(self) -> bytes:
        """One request's bytes (head, and a body of its Content-Length), recorded; b"" once the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.server.closed_by_client += 1
            return b""
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        request = head + await self.reader.readexactly(length)
        self.server.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed(self) -> None:
        """Read (and drop) until the client closes the connection; counted in ``closed_by_client``."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.server.closed_by_client += 1

    async def trickle(self, data: Iterator[bytes], interval: float) -> None:
        """Write one piece every ``interval`` until the pieces or the connection end."""
        for piece in data:
            if self.reader.at_eof() or self.writer.is_closing():  # (uvloop refuses a write once closed)
                break
            await self.send(piece)
            await asyncio.sleep(interval)
        await self.wait_closed()


Script = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 that runs ``script`` on each accepted connection, then closes it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.active = 0
        self.max_active = 0  # the most connections open at once (as the server sees them)
        self.closed_by_client = 0  # connections on which the server saw the client close (EOF, reset, broken pipe)
        self.requests: list[bytes] = []
        self.port = 0
        self._tasks: set[asyncio.Task[Any]] = set()  # the scripts running
        self._handlers: set[asyncio.Task[Any]] = set()  # asyncio's tasks running _serve

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, self.accepted = self.accepted, self.accepted + 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        # The script in a task of its own, so that stopping the server cancels it and not asyncio's handler task.
        task = asyncio.ensure_future(self.script(Peer(self, index, reader, writer)))
        self._tasks.add(task)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await asyncio.wait([task])
            if not task.cancelled():
                if isinstance(task.exception(), ConnectionError):  # a write after the client closed
                    self.closed_by_client += 1
                else:
                    task.result()
        finally:
            self.active -= 1
            self._tasks.discard(task)
            self._handlers.discard(handler)
            writer.close()


@contextlib.asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[RawServer]:
    server = RawServer(script)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        tasks = list(server._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *server._handlers, return_exceptions=True)
        await listener.wait_closed()


@contextlib.asynccontextmanager
async def pool(
    port: int,
    *,
    tls: bool = False,
    limit: int = 8,
    connect_timeout: float = 5.0,
    read_timeout: float = 5.0,
    total_timeout: float = 0.0,
    keepalive: float = http1.KEEPALIVE,
) -> AsyncIterator[Pool]:
    client = Pool(
        "127.0.0.1",
        port,
        tls=tls,
        limit=limit,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        total_timeout=total_timeout,
        keepalive=keepalive,
    )
    try:
        yield client
    finally:
        await client.close()


def answer(body: bytes = b"ok", *head: bytes) -> bytes:
    """A 200 answer with a Content-Length body and extra header lines."""
    lines = [b"HTTP/1.1 200 OK", *head, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def answering(*answers: bytes, delay: float = 0.0) -> Script:
    """A script answering each request on a connection with the next answer (the last one repeated)."""

    async def script(peer: Peer) -> None:
        count = 0
        while await peer.request():
            if delay:
                await asyncio.sleep(delay)
            await peer.send(answers[min(count, len(answers) - 1)])
            count += 1

    return script


async def read_all(response: Response) -> bytes:
    chunks = []
    while chunk := await response.readany():
        chunks.append(chunk)
    return b"".join(chunks)


async def get(client: Pool, target: str = "/", method: str = "GET") -> tuple[Response, bytes]:
    """Send a request without headers or body and read its answer to the end."""
    response = await client.send(method, target, [], b"")
    try:
        return response, await read_all(response)
    finally:
        response.release()


def assert_failure(exc: BaseException, error_class: type[http1.UpstreamError], error: str, status: int) -> None:
    """The exception is exactly ``error_class`` and the proxy reports it as ``error`` with ``status``."""
    assert type(exc) is error_class, repr(exc)
    failure = classify(exc)
    assert (failure.error, failure.status) == (error, status), failure


# --- the request on the wire, keep-alive ---------------------------------------------------------------------


async def test_requests_share_one_connection_and_carry_exactly_the_given_headers() -> None:
    """Host (with the port), the headers in order and as given, Content-Length for a body or an empty
    POST/PUT/PATCH and for nothing else; nothing added; six requests in sequence on one connection."""
    async with raw_server(answering(OK)) as server, pool(server.port) as client:
        headers = [("X-First", "1"), ("content-type", "application/json"), ("X-First", "again")]
        for method, body in [("GET", b""), ("POST", b'{"a": 1}'), ("POST", b""), ("PUT", b""), ("PATCH", b"")]:
            response = await client.send(method, "/v1/x?q=a%20b", headers, body)
            assert (response.status, await read_all(response)) == (200, b"ok")
            response.release()
        response, body = await get(client, "/health", "DELETE")
        assert response.status == 200
        assert body == b"ok"
        host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
        given = b"X-First: 1\r\ncontent-type: application/json\r\nX-First: again\r\n"
        assert server.requests == [
            b"GET /v1/x?q=a%20b HTTP/1.1\r\n" + host + given + b"\r\n",
            b"POST /v1/x?q=a%20b HTTP/1.1\r\n" + host + given + b'Content-Length: 8\r\n\r\n{"a": 1}',
            b"POST /v1/x?q=a%20b HTTP/1.1\r\n" + host + given + b"Content-Length: 0\r\n\r\n",
            b"PUT /v1/x?q=a%20b HTTP/1.1\r\n" + host + given + b"Content-Length: 0\r\n\r\n",
            b"PATCH /v1/x?q=a%20b HTTP/1.1\r\n" + host + given + b"Content-Length: 0\r\n\r\n",
            b"DELETE /health HTTP/1.1\r\n" + host + b"\r\n",
        ]
        assert server.accepted == 1
        assert (client.open_connections, client.idle_connections) == (1, 1)


async def test_a_body_on_any_method_gets_a_content_length() -> None:
    async with raw_server(answering(OK)) as server, pool(server.port) as client:
        response = await client.send("DELETE", "/x", [], b"abc")
        assert await read_all(response) == b"ok"
        assert server.requests == [
            b"DELETE /x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 3\r\n\r\nabc" % server.port
        ]


def test_the_host_header_names_the_port_only_when_it_is_not_the_default() -> None:
    def authority(host: str, port: int, tls: bool) -> str:
        return Pool(host, port, tls=tls, limit=1, connect_timeout=1, read_timeout=1).authority

    assert authority("api.example.com", 80, False) == "api.example.com"
    assert authority("api.example.com", 443, True) == "api.example.com"
    assert authority("api.example.com", 443, False) == "api.example.com:443"
    assert authority("api.example.com", 80, True) == "api.example.com:80"
    assert authority("10.0.0.1", 8000, False) == "10.0.0.1:8000"
    assert authority("::1", 443, True) == "[::1]"
    assert authority("::1", 8443, True) == "[::1]:8443"


# --- bodies ----------------------------------------------------------------------------------------------------


async def test_a_content_length_body_and_the_head_as_sent() -> None:
    raw = b"HTTP/1.1 201 Created Now\r\nX-B: 1\r\ncontent-type: text/plain\r\nX-B: 2\r\nContent-Length: 5\r\n\r\nhello"
    async with raw_server(answering(raw)) as server, pool(server.port) as client:
        response, body = await get(client)
        assert (response.status, response.reason, body) == (201, "Created Now", b"hello")
        assert response.headers == [("X-B", "1"), ("content-type", "text/plain"), ("X-B", "2"), ("Content-Length", "5")]
        assert response.header("CONTENT-TYPE") == "text/plain"
        assert response.header("x-b") == "1"
        assert response.header("missing") is None


async def test_a_chunked_body_is_de_chunked_and_the_connection_reused() -> None:
    async def script(peer: Peer) -> None:
        while await peer.request():
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
            await asyncio.sleep(0.01)
            await peer.send(b"lo\r\n")
            await asyncio.sleep(0.01)
            await peer.send(b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")

    async with raw_server(script) as server, pool(server.port) as client:
        for _ in range(2):
            response, body = await get(client)
            assert (response.status, body) == (200, b"hello world")
        assert server.accepted == 1


async def test_a_close_delimited_body_ends_at_eof_and_its_connection_is_not_reused() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        await asyncio.sleep(0.01)
        await peer.send(b"second part")

    async with raw_server(script) as server, pool(server.port) as client:
        for _ in range(2):
            response, body = await get(client)
            assert (response.status, body) == (200, b"first part, second part")
        assert server.accepted == 2
        await eventually(lambda: client.open_connections == 0)


async def test_a_head_answer_has_no_body_and_the_connection_is_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n"
    async with raw_server(answering(head, answer(b"the body"))) as server, pool(server.port) as client:
        response, body = await get(client, "/", "HEAD")
        assert (response.status, response.header("content-length"), body) == (200, "1000", b"")
        response, body = await get(client, "/")
        assert (response.status, body) == (200, b"the body")
        assert server.accepted == 1


async def test_204_and_304_answers_have_no_body_and_the_connection_is_reused() -> None:
    answers = (
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\nContent-Length: 50\r\n\r\n",
        answer(b"after"),
    )
    async with raw_server(answering(*answers)) as server, pool(server.port) as client:
        assert [(r.status, body) for r, body in [await get(client) for _ in range(3)]] == [
            (204, b""),
            (304, b""),
            (200, b"after"),
        ]
        assert server.accepted == 1


async def test_informational_answers_are_skipped() -> None:
    """A 100 Continue and a 103 Early Hints (its head in two writes) before the answer: the answer's status,
    reason and headers only; the connection serves the next request."""

    async def script(peer: Peer) -> None:
        while await peer.request():
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=pre")
            await asyncio.sleep(0.01)
            await peer.send(b"load\r\n\r\n")
            await asyncio.sleep(0.01)
            await peer.send(b"HTTP/1.1 202 Accepted\r\nX-Real: 1\r\nContent-Length: 4\r\n\r\nreal")

    async with raw_server(script) as server, pool(server.port) as client:
        for _ in range(2):
            response, body = await get(client)
            assert (response.status, response.reason, response.headers, body) == (
                202,
                "Accepted",
                [("X-Real", "1"), ("Content-Length", "4")],
                b"real",
            )
        assert server.accepted == 1


async def test_a_large_body_read_slowly_arrives_whole_with_bounded_buffering() -> None:
    """8 MiB to a reader that sleeps between reads: every byte in order, and ``buffered`` never above
    BUFFER_HIGH plus one socket read (the socket is paused; without that the whole body would pile up)."""
    payload = os.urandom(8 * 1024 * 1024)

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(payload))
        await peer.wait_closed()

    async with raw_server(script) as server, pool(server.port) as client:
        response = await client.send("GET", "/big", [], b"")
        try:
            await eventually(lambda: response.buffered > BUFFER_HIGH)
            await asyncio.sleep(0.1)  # time for the rest of the body to pour in, were the socket not paused
            most = response.buffered
            chunks = []
            while True:
                most = max(most, response.buffered)
                chunk = await response.readany()
                if not chunk:
                    break
                chunks.append(chunk)
                await asyncio.sleep(0.001)
        finally:
            response.release()
        assert most <= BUFFER_HIGH + SOCKET_READ, most
        assert b"".join(chunks) == payload
        assert response.buffered == 0


async def test_a_reader_paused_longer_than_the_read_timeout_is_not_a_read_timeout() -> None:
    """The read timeout measures the upstream's silence, not the time the socket is paused for a slow reader."""
    payload = os.urandom(1024 * 1024)

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(payload))
        await peer.wait_closed()

    async with raw_server(script) as server, pool(server.port, read_timeout=0.2) as client:
        response = await client.send("GET", "/big", [], b"")
        try:
            await eventually(lambda: response.buffered > BUFFER_HIGH)  # paused from here on
            await asyncio.sleep(0.5)
            assert await read_all(response) == payload
        finally:
            response.release()


async def test_an_answer_ending_while_the_socket_is_paused_keeps_its_connection() -> None:
    """A body one byte over BUFFER_HIGH, left unread until it is all in: its last read pauses the socket and
    ends the answer at once; the connection still goes back to the pool (resumed) and serves the next request."""
    payload = b"x" * (BUFFER_HIGH + 1)
    async with raw_server(answering(answer(payload), answer(b"next"))) as server, pool(server.port) as client:
        response = await client.send("GET", "/", [], b"")
        await eventually(lambda: response.buffered == len(payload))
        assert await read_all(response) == payload
        response.release()
        response, body = await get(client)
        assert server.accepted == 1
        assert body == b"next"


# --- failures --------------------------------------------------------------------------------------------------


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with pool(free_port()) as client:
        with pytest.raises(http1.ConnectError) as info:
            await client.send("GET", "/", [], b"")
        assert_failure(info.value, http1.ConnectError, "connect_error", 502)
        assert client.open_connections == 0


async def test_a_tls_handshake_nobody_answers_is_a_connect_timeout() -> None:
    async with raw_server(Peer.wait_closed) as server, pool(server.port, tls=True, connect_timeout=0.2) as client:
        with pytest.raises(http1.ConnectTimeout) as info:
            await client.send("GET", "/", [], b"")
        assert_failure(info.value, http1.ConnectTimeout, "connect_timeout", 504)
        await eventually(lambda: server.closed_by_client == 1)
        assert client.open_connections == 0


async def test_an_upstream_that_never_answers_is_a_read_timeout() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.wait_closed()

    async with raw_server(script) as server, pool(server.port, read_timeout=0.2) as client:
        with pytest.raises(http1.ReadTimeout) as info:
            await client.send("GET", "/", [], b"")
        assert_failure(info.value, http1.ReadTimeout, "read_timeout", 504)
        await eventually(lambda: server.closed_by_client == 1)
        await eventually(lambda: client.open_connections == 0)


async def test_silence_in_the_middle_of_a_body_is_a_read_timeout() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        await peer.wait_closed()

    async with raw_server(script) as server, pool(server.port, read_timeout=0.2) as client:
        response = await client.send("GET", "/", [], b"")
        with pytest.raises(http1.ReadTimeout) as info:
            await read_all(response)
        response.release()
        assert_failure(info.value, http1.ReadTimeout, "read_timeout", 504)
        await eventually(lambda: server.closed_by_client == 1)


def _endless_head() -> Iterator[bytes]:
    yield from (bytes([byte]) for byte in b"HTTP/1.1 200 OK\r\n")
    while True:
        yield from (bytes([byte]) for byte in b"X-Slow: 1\r\n")


async def test_a_head_trickled_past_the_total_timeout_is_a_timeout() -> None:
    """A byte every 10 ms keeps the read timeout (5 s) away; the total timeout (0.3 s) ends the request."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.trickle(_endless_head(), 0.01)

    async with raw_server(script) as server, pool(server.port, read_timeout=5.0, total_timeout=0.3) as client:
        with pytest.raises(http1.TotalTimeout) as info:
            await client.send("GET", "/", [], b"")
        assert_failure(info.value, http1.TotalTimeout, "timeout", 504)
        await eventually(lambda: server.closed_by_client == 1)


async def test_a_body_trickled_past_the_total_timeout_is_a_timeout() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        await peer.trickle(iter(lambda: b"x", None), 0.01)

    async with raw_server(script) as server, pool(server.port, read_timeout=5.0, total_timeout=0.3) as client:
        response = await client.send("GET", "/", [], b"")
        with pytest.raises(http1.TotalTimeout) as info:
            await read_all(response)
        response.release()
        assert_failure(info.value, http1.TotalTimeout, "timeout", 504)
        await eventually(lambda: server.closed_by_client == 1)


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"], ids=["nothing", "part-of-the-head"])
async def test_a_close_before_the_answer_is_disconnected(partial: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        if partial:
            await peer.send(partial)

    async with raw_server(script) as server, pool(server.port) as client:
        with pytest.raises(http1.Disconnected) as info:
            await client.send("POST", "/", [], b"{}")
        assert_failure(info.value, http1.Disconnected, "disconnected", 502)
        await eventually(lambda: client.open_connections == 0)


@pytest.mark.parametrize(
    "partial",
    [b"Content-Length: 10\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"],
    ids=["content-length", "chunked"],
)
async def test_a_body_cut_short_is_a_payload_error_from_readany(partial: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n" + partial)

    async with raw_server(script) as server, pool(server.port) as client:
        response = await client.send("GET", "/", [], b"")
        assert response.status == 200
        with pytest.raises(http1.PayloadError) as info:
            await read_all(response)
        with pytest.raises(http1.PayloadError):  # and again: the failure stays
            await response.readany()
        response.release()
        assert_failure(info.value, http1.PayloadError, "payload_error", 502)
        await eventually(lambda: client.open_connections == 0)


def _many_headers(count: int, size: int = 1) -> bytes:
    return b"".join(b"X-H-%d: %s\r\n" % (i, b"v" * size) for i in range(count))


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + _many_headers(MAX_HEADERS + 1) + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + _many_headers(MAX_HEADERS - 1, 512) + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["garbage", "two-lengths", "upgrade", "too-many-headers", "one-huge-header", "too-many-header-bytes"],
)
async def test_a_malformed_or_oversized_head_is_a_bad_response(raw: bytes) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(raw)
        await peer.wait_closed()

    async with raw_server(script) as server, pool(server.port) as client:
        with pytest.raises(http1.BadResponse) as info:
            await client.send("GET", "/", [], b"")
        assert_failure(info.value, http1.BadResponse, "bad_response", 502)
        await eventually(lambda: server.closed_by_client == 1)
        await eventually(lambda: client.open_connections == 0)


async def test_a_head_within_the_bounds_is_accepted() -> None:
    """MAX_HEADERS fields, just under MAX_HEAD_BYTES in all: an answer."""
    size = MAX_HEAD_BYTES // MAX_HEADERS - 20
    raw = b"HTTP/1.1 200 OK\r\n" + _many_headers(MAX_HEADERS - 1, size) + b"Content-Length: 2\r\n\r\nok"
    async with raw_server(answering(raw)) as server, pool(server.port) as client:
        response, body = await get(client)
        assert (len(response.headers), body) == (MAX_HEADERS, b"ok")


async def test_an_oversized_head_that_never_ends_is_a_bad_response_at_once() -> None:
    """A header value growing past MAX_HEAD_BYTES with no end of line: refused when the bound is passed, not
    buffered until the read timeout (which is far away here)."""

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        await peer.trickle(iter([b"a" * 4096] * (2 * MAX_HEAD_BYTES // 4096)), 0.0)

    async with raw_server(script) as server, pool(server.port, read_timeout=30.0) as client:
        with pytest.raises(http1.BadResponse) as info:
            async with asyncio.timeout(10):
                await client.send("GET", "/", [], b"")
        assert_failure(info.value, http1.BadResponse, "bad_response", 502)
        await eventually(lambda: server.closed_by_client == 1)


async def test_an_idle_connection_the_server_closed_is_not_used_again() -> None:
    async def script(peer: Peer) -> None:  # one answer per connection, then close
        await peer.request()
        await peer.send(answer(b"one per connection"))

    async with raw_server(script) as server, pool(server.port) as client:
        response, body = await get(client)
        assert body == b"one per connection"
        await eventually(lambda: server.active == 0)
        await eventually(lambda: client.open_connections == 0)  # the client saw the close
        response, body = await get(client)
        assert body == b"one per connection"
        assert server.accepted == 2


# --- the pool --------------------------------------------------------------------------------------------------


async def test_limit_one_serves_concurrent_requests_one_connection_at_a_time() -> None:
    async def echo_path(peer: Peer) -> None:
        while request := await peer.request():
            await asyncio.sleep(0.01)
            await peer.send(answer(request.split(b" ")[1]))

    async with raw_server(echo_path) as server, pool(server.port, limit=1) as client:
        waits: list[None] = []
        client.on_wait = lambda: waits.append(None)
        results = await asyncio.gather(*(get(client, f"/{i}") for i in range(3)))
        assert [body for _, body in results] == [b"/0", b"/1", b"/2"]
        assert (server.accepted, server.max_active) == (1, 1)
        assert client.open_connections == 1
        assert len(waits) == 2  # the second and third request waited for the pool (the proxy counts each)


async def test_limit_one_with_connections_closed_after_each_answer() -> None:
    """The server closes after each answer: a waiting request gets the freed slot and opens the next one."""

    async def script(peer: Peer) -> None:
        request = await peer.request()
        await asyncio.sleep(0.01)
        await peer.send(answer(request.split(b" ")[1], b"Connection: close"))

    async with raw_server(script) as server, pool(server.port, limit=1) as client:
        results = await asyncio.gather(*(get(client, f"/{i}") for i in range(3)))
        assert [body for _, body in results] == [b"/0", b"/1", b"/2"]
        assert (server.accepted, server.max_active) == (3, 1)
        await eventually(lambda: client.open_connections == 0)


async def test_a_request_cancelled_while_waiting_for_its_head_closes_its_connection() -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 0:  # the first connection never answers
            await peer.request()
            await peer.wait_closed()
        else:
            await answering(OK)(peer)

    async with raw_server(script) as server, pool(server.port, limit=1) as client:
        waiting = asyncio.ensure_future(client.send("GET", "/slow", [], b""))
        await eventually(lambda: len(server.requests) == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: server.closed_by_client == 1)
        await eventually(lambda: client.open_connections == 0)
        response, body = await get(client)
        assert body == b"ok"
        assert (server.accepted, client.open_connections, client.idle_connections) == (2, 1, 1)


async def test_a_request_cancelled_while_waiting_for_a_slot_leaves_the_queue() -> None:
    async with raw_server(answering(OK, delay=0.05)) as server, pool(server.port, limit=1) as client:
        first = asyncio.ensure_future(get(client, "/first"))
        queued = asyncio.ensure_future(get(client, "/queued"))
        await eventually(lambda: len(server.requests) == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        _, body = await first
        assert body == b"ok"
        _, body = await get(client, "/after")
        assert body == b"ok"
        assert [request.split(b" ")[1] for request in server.requests] == [b"/first", b"/after"]
        assert server.accepted == 1


async def test_releasing_an_answer_read_partly_closes_its_connection_and_frees_the_slot() -> None:
    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            await peer.wait_closed()
        else:
            await answering(OK)(peer)

    async with raw_server(script) as server, pool(server.port, limit=1) as client:
        response = await client.send("GET", "/", [], b"")
        assert await response.readany()
        response.release()
        await eventually(lambda: server.closed_by_client == 1)
        await eventually(lambda: client.open_connections == 0)
        assert client.idle_connections == 0
        _, body = await get(client)
        assert body == b"ok"
        assert server.accepted == 2


async def test_an_idle_connection_older_than_keepalive_is_not_reused() -> None:
    async with raw_server(answering(OK)) as server, pool(server.port, keepalive=0.05) as client:
        await get(client)
        await asyncio.sleep(0.1)  # the idle connection is now older than keepalive
        _, body = await get(client)
        assert body == b"ok"
        assert server.accepted == 2
        await eventually(lambda: server.closed_by_client == 1)  # the stale one was closed
        assert (client.open_connections, client.idle_connections) == (1, 1)


async def test_close_closes_idle_connections_and_refuses_new_requests() -> None:
    async with raw_server(answering(OK, delay=0.01)) as server, pool(server.port) as client:
        await asyncio.gather(get(client), get(client))
        assert (server.accepted, client.idle_connections) == (2, 2)
        await client.close()
        assert client.idle_connections == 0
        await eventually(lambda: server.closed_by_client == 2)
        await eventually(lambda: client.open_connections == 0)
        with pytest.raises(http1.ConnectError) as info:
            await client.send("GET", "/", [], b"")
        assert_failure(info.value, http1.ConnectError, "connect_error", 502)
        assert server.accepted == 2


async def test_close_fails_queued_requests_and_lets_the_running_one_finish() -> None:
    release = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        await release.wait()
        await peer.send(OK)
        await peer.wait_closed()

    async with raw_server(script) as server, pool(server.port, limit=1) as client:
        running = asyncio.ensure_future(get(client, "/running"))
        await eventually(lambda: len(server.requests) == 1)
        queued = asyncio.ensure_future(client.send("GET", "/queued", [], b""))
        await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(http1.ConnectError):
            await queued
        release.set()
        _, body = await running
        assert body == b"ok"
        await eventually(lambda: server.closed_by_client == 1)  # finished, it was not kept
        assert (client.open_connections, client.idle_connections, server.accepted) == (0, 0, 1)


# --- Upstream --------------------------------------------------------------------------------------------------


async def test_upstream_sends_its_url_path_prefix_before_the_target() -> None:
    async with raw_server(answering(OK)) as server:
        upstream = Upstream("incumbent", UpstreamConfig(url=f"http://127.0.0.1:{server.port}/openai/v1/"))
        try:
            response = await upstream.send("POST", "/chat/completions?x=1", [("Content-Type", "json")], b"{}")
            assert await read_all(response) == b"ok"
            response.release()
        finally:
            await upstream.close()
        assert server.requests == [
            b"POST /openai/v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: json\r\nContent-Length: 2\r\n\r\n{}" % server.port
        ]


async def test_upstream_probe_reports_the_health_status_or_the_failure_class() -> None:
    async with raw_server(answering(answer(b"healthy"), b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")) as server:
        healthy = Upstream("incumbent", UpstreamConfig(url=f"http://127.0.0.1:{server.port}", health_path="/health"))
        refused = Upstream("candidate", UpstreamConfig(url=f"http://127.0.0.1:{free_port()}", health_path="/health"))
        try:
            assert await healthy.probe(5.0) == (True, "HTTP 200")
            assert await healthy.probe(5.0) == (False, "HTTP 503")
            assert await refused.probe(5.0) == (False, "connect_error")
        finally:
            await healthy.close()
            await refused.close()
        assert [request.split(b"\r\n")[0] for request in server.requests] == [b"GET /health HTTP/1.1"] * 2
        assert server.accepted == 1


# --- the same on uvloop ----------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (subjectAltName IP) and its key, made by openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


async def _https_round_trip(cert: Path, key: Path) -> tuple[bytes, BaseException | None]:
    """One GET to a TLS server on loopback: the body, and the failure of a second pool made without trusting
    the certificate (the trust store is read when a pool is made)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = RawServer(answering(OK))
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_context)
    port = listener.sockets[0].getsockname()[1]
    try:
        os.environ["SSL_CERT_FILE"] = str(cert)
        try:
            trusting = Pool("127.0.0.1", port, tls=True, limit=2, connect_timeout=5, read_timeout=5)
        finally:
            del os.environ["SSL_CERT_FILE"]
        try:
            _, body = await get(trusting)
        finally:
            await trusting.close()
        async with pool(port, tls=True) as untrusting:
            try:
                await get(untrusting)
            except http1.UpstreamError as exc:
                return body, exc
        return body, None
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_https_upstream_is_verified_against_the_trust_store(tmp_path: Path, loop: str) -> None:
    """TLS to the upstream (OpenAI, Anthropic): the answer comes back over a verified connection, and a
    certificate the trust store does not hold is refused (connect_error), never silently accepted."""
    cert, key = _self_signed(tmp_path)
    run = uvloop.run if loop == "uvloop" else asyncio.run
    body, refused = run(_https_round_trip(cert, key))
    assert body == b"ok"
    assert refused is not None
    assert_failure(refused, http1.ConnectError, "connect_error", 502)
    assert "certificate" in str(refused).lower()


def _uvloop_cases() -> Iterator[Any]:
    """Every scenario above (each of its parameters, if any) as a ``pytest.param(scenario, kwargs)``."""
    for name, scenario in list(globals().items()):
        if not (name.startswith("test_") and inspect.iscoroutinefunction(scenario)):
            continue
        marks = [mark for mark in getattr(scenario, "pytestmark", []) if mark.name == "parametrize"]
        if not marks:
            yield pytest.param(scenario, {}, id=name)
            continue
        argname, values = marks[0].args
        for value, value_id in zip(values, marks[0].kwargs["ids"], strict=True):
            yield pytest.param(scenario, {argname: value}, id=f"{name}[{value_id}]")


@pytest.mark.parametrize(("scenario", "kwargs"), list(_uvloop_cases()))
def test_on_uvloop(scenario: Callable[..., Coroutine[Any, Any, None]], kwargs: dict[str, Any]) -> None:
    """Each scenario above again on uvloop, the loop the proxy runs on."""
    uvloop.run(scenario(**kwargs))

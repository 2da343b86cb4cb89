"""Slow and greedy clients: header and body timeouts, the connection and in-flight caps, JSON-only logs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.tools.embedded_redis import free_port

from .conftest import echo, eventually, wait_healthy

SLOW = {"header_timeout": 2.0, "body_timeout": 2.0, "body_min_rate": 1024}


class Serve:
    """A `python -m proxy serve` subprocess, its ports and its log."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, admin: int, log: Path) -> None:
        self.process, self.port, self.admin, self.log = process, port, admin, log

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]

    def counter(self, name: str, reason: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        match = re.search(rf'^{name}{{reason="{reason}"}} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Serve]]:
    """Factory: `python -m proxy serve` in front of an incumbent, with SHADOW_PROXY_LIMITS_* set; stopped after."""
    started: list[Serve] = []

    def start(incumbent: str, **limits: float) -> Serve:
        port, admin = free_port(), free_port()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SHADOW_PROXY_RECORD_ENABLED": "false"}
        env.update({f"SHADOW_PROXY_LIMITS_{k.upper()}": str(v) for k, v in limits.items()})
        log = tmp_path / f"serve-{port}.log"
        args = ["serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", *args, "--incumbent", incumbent], env=env, stdout=out, stderr=out
            )
        server = Serve(process, port, admin, log)
        started.append(server)
        wait_healthy(admin, process, log)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


async def _trickle(port: int, head: bytes, *, interval: float = 1.0) -> tuple[float, bytes]:
    """Send ``head`` then one byte per interval until the proxy closes; how long that took and its answer."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    reading = asyncio.ensure_future(reader.read())
    while not reading.done():
        try:
            writer.write(b"x")
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.wait([reading], timeout=interval)
    try:
        answer = await reading
    except ConnectionError:
        answer = b""  # a reset may overtake the 408 when bytes were still in flight
    writer.close()
    return time.monotonic() - started, answer


async def _timed_get(url: str) -> float:
    started = time.monotonic()
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        assert resp.status == 200
        await resp.read()
    return time.monotonic() - started


@pytest.mark.slow
async def test_a_slowloris_flood_is_cut_while_normal_requests_are_served(upstreams, serve) -> None:
    """200 connections trickling headers or bodies at 1 byte/s: a normal request still answers within 1 s,
    each slow one is closed once its timeout has passed (not before), memory stays bounded, all are counted."""
    incumbent = await upstreams(echo)
    proxy = serve(incumbent.url, **SLOW)
    rss_before = proxy.rss_kib()
    header = b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Slow: "
    body = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    flood = [asyncio.ensure_future(_trickle(proxy.port, header if i % 2 else body)) for i in range(200)]
    await asyncio.sleep(0.5)  # let the flood connect
    rss_peak = proxy.rss_kib()
    normal = [await _timed_get(f"http://127.0.0.1:{proxy.port}/v1/normal") for _ in range(5)]
    async with asyncio.timeout(30):
        slow = await asyncio.gather(*flood)
    assert max(normal) < 1.0, normal
    assert min(lasted for lasted, _ in slow) >= SLOW["header_timeout"] - 0.05
    assert all(answer.startswith(b"HTTP/1.1 408 ") for _, answer in slow if answer)
    assert proxy.counter("shadow_proxy_connections_closed_total", "header_timeout") == 100
    assert proxy.counter("shadow_proxy_requests_rejected_total", "body_timeout") == 100
    assert rss_peak - rss_before < 64 * 1024, (rss_before, rss_peak)


async def test_a_body_that_keeps_coming_is_not_cut(upstreams, proxies) -> None:
    """A body slower than body_timeout in total but above body_min_rate arrives whole."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False}, limits={"body_timeout": 0.5})

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 8192
            await asyncio.sleep(0.15)

    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=body()) as resp:
            assert resp.status == 200
            assert (await resp.json())["bytes"] == 65536


async def test_a_connection_that_never_sends_is_closed_without_a_408(upstreams, proxies) -> None:
    """A connection opened and never used is closed at the header timeout without an answer (a client may be
    sending on it at that moment and would read a 408 as its own answer), counted as idle_timeout."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False}, limits={"header_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # closed, nothing written
    writer.close()
    metrics = proxy.runtime.metrics
    assert metrics.value("shadow_proxy_connections_closed_total", reason="idle_timeout") == 1
    assert metrics.value("shadow_proxy_connections_closed_total", reason="header_timeout") == 0


async def test_an_idle_keep_alive_connection_is_not_a_slow_header(upstreams, proxies) -> None:
    """The header timeout runs from a request's first byte: a kept-alive connection idle longer still works."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False}, limits={"header_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for _ in range(2):
        writer.write(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b"}")
        await asyncio.sleep(0.6)
    writer.close()
    assert proxy.runtime.metrics.value("shadow_proxy_connections_closed_total", reason="header_timeout") == 0


async def test_connections_over_the_cap_get_503_with_retry_after(upstreams, proxies) -> None:
    """Over limits.max_connections a connection is answered 503 JSON with Retry-After and closed, and counted;
    once a connection closes, a new one is served."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False}, limits={"max_connections": 3})
    idle = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    await eventually(lambda: proxy.guard.connections == 3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in head
    assert orjson.loads(body)["error"]["type"] == "overloaded"
    assert proxy.runtime.metrics.value("shadow_proxy_connections_closed_total", reason="max_connections") == 1
    idle[0][1].close()
    await eventually(lambda: proxy.guard.connections == 2)
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{proxy.port}/v1/x") as resp:
        assert resp.status == 200
    for _, w in idle[1:]:
        w.close()


async def test_requests_over_the_in_flight_cap_get_503_with_retry_after(upstreams, proxies) -> None:
    """Over limits.max_in_flight a request is answered 503 JSON with Retry-After, counted; the others finish."""
    release = asyncio.Event()
    arrived: list[str] = []

    async def held(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await release.wait()
        return web.json_response({"ok": True})

    incumbent = await upstreams(held)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False}, limits={"max_in_flight": 2})
    url = f"http://127.0.0.1:{proxy.port}/v1/x"
    async with aiohttp.ClientSession() as client:

        async def status() -> int:
            async with client.get(url) as resp:
                return resp.status

        first = [asyncio.ensure_future(status()) for _ in range(2)]
        await eventually(lambda: len(arrived) == 2)
        async with client.get(url) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["type"] == "overloaded"
        release.set()
        assert await asyncio.gather(*first) == [200, 200]
    assert proxy.runtime.metrics.value("shadow_proxy_requests_rejected_total", reason="over_capacity") == 1


MALFORMED = {
    "a 70 KiB header line": b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70 * 1024 + b"\r\n\r\n",
    "500 headers": b"GET /v1/x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    "Content-Length with Transfer-Encoding": (
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "a negative Content-Length": b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "a bad chunk size": b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
}


async def _send(port: int, *parts: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for part in parts:
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.1)  # a separate TCP write: the second part reaches a handler already running
    answer = await reader.read()
    writer.close()
    return answer


@pytest.mark.slow
async def test_malformed_requests_get_400_and_the_log_stays_json(upstreams, serve) -> None:
    """Each malformed request is answered 400 with a JSON error; stderr holds only JSON lines, no traceback,
    and repeats of one kind of error are one warning line."""
    incumbent = await upstreams(echo)
    proxy = serve(incumbent.url)
    for name, data in MALFORMED.items():
        answer = await _send(proxy.port, data)
        assert answer.split(b" ", 2)[1] == b"400", (name, answer[:200])
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "bad_request", name
    late = await _send(proxy.port, b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\n")
    assert late.split(b" ", 2)[1] == b"400", late[:200]
    for _ in range(3):
        assert (await _send(proxy.port, MALFORMED["a 70 KiB header line"])).split(b" ", 2)[1] == b"400"
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(30) == 0
    lines = proxy.log.read_text().splitlines()
    assert lines and "Traceback" not in proxy.log.read_text()
    events = [orjson.loads(line) for line in lines]  # every line is one JSON object
    malformed = [e for e in events if e["event"] == "request_malformed"]
    assert 1 <= len(malformed) <= len(MALFORMED) + 1
    assert sum(e["kind"] == "LineTooLong" for e in malformed) == 1

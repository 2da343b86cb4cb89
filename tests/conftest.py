"""Real parts for the tests: a redis-server process, upstream HTTP servers and the proxy on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import logs
from proxy.config import Config, load_config
from proxy.server import ProxyServer
from proxy.tools.embedded_redis import EmbeddedRedis

from .cluster import LocalCluster

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real redis-server for the session, started the same way `serve` starts its embedded one."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session Redis, flushed before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One real Redis Cluster for the session (three masters, one replica each), started on first use."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """The session cluster's ``redis+cluster://`` URL, every master flushed before each test."""
    redis_cluster.wait_ok()
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class Upstream:
    """A real HTTP server on a loopback port, serving one handler for every method and path."""

    def __init__(self, handler: Handler) -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._record(handler))
        self.server = TestServer(app, host="127.0.0.1")
        self.requests: list[dict[str, Any]] = []

    def _record(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.requests.append(
                {
                    "method": request.method,
                    "raw_path": request.raw_path,
                    "headers": list(request.headers.items()),
                    "body": body,
                }
            )
            return await handler(request)

        return wrapped

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[Handler], Awaitable[Upstream]]]:
    """Factory: start an upstream server for a handler; all are closed after the test."""
    started: list[Upstream] = []

    async def start(handler: Handler) -> Upstream:
        upstream = Upstream(handler)
        await upstream.server.start_server()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.server.close()


async def echo(request: web.Request) -> web.Response:
    """Answers with JSON describing what arrived."""
    body = await request.read()
    return web.json_response({"method": request.method, "path": request.raw_path, "bytes": len(body)})


def make_config(**sections: Any) -> Config:
    """A config for tests: loopback listeners on free ports, no environment, overrides per section
    (a section is a table, or a list of tables for [[candidate]])."""
    base: dict[str, dict[str, Any]] = {
        "proxy": {"listen": "127.0.0.1:0", "shutdown_timeout": 5.0},
        "admin": {"listen": "127.0.0.1:0"},
        "record": {"retry_interval": 0.05},
        # A/A copies (on by default) add random requests to the incumbent: tests that want them say so.
        "compare": {"noise_sample_rate": 0.0},
    }
    for name, values in sections.items():
        base[name] = values if isinstance(values, list) else {**base.get(name, {}), **values}
    return load_config(None, environ={}, overrides=base)


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Awaitable[ProxyServer]]]:
    """Factory: start an in-process proxy with make_config(**sections); stopped after the test."""
    started: list[ProxyServer] = []

    async def start(**sections: Any) -> ProxyServer:
        server = ProxyServer(make_config(**sections))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if not server.runtime.shutting_down:
            await server.stop()


async def eventually(predicate: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait until a condition holds, failing after a generous deadline (not a timing assertion)."""
    async with asyncio.timeout(within):
        # Polling on purpose: the conditions are facts in other components (counters, streams).
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def wait_healthy(admin_port: int, process: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Wait (30 s at most) until a `serve` process answers /healthz on its admin port; fail at once if it exits."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=1) as answer:
                answer.read()
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"serve on admin port {admin_port} did not become healthy: {log.read_text() if log else ''}")


def records(client: redis.Redis, key: str = "{shadow}:records") -> list[dict[str, Any]]:
    """Every record in the stream, with meta parsed."""
    out = []
    for _, fields in client.xrange(key):
        entry = {k.decode(): v for k, v in fields.items()}
        entry["meta"] = orjson.loads(entry["meta"])
        out.append(entry)
    return out


@pytest.fixture(scope="session", autouse=True)
def quiet_logs() -> None:
    """Tests read counters and records, not logs: keep only warnings (pytest shows them on failure)."""
    logs.configure("warning", "console")

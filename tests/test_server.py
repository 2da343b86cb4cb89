"""The `serve` process: embedded Redis, graceful shutdown under load, several workers on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
import redis
from aiohttp import web

from proxy.tools.embedded_redis import free_port

from .conftest import echo, eventually, wait_healthy


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "SHADOW_PROXY_PROXY_LOG_LEVEL": "info",
    }


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: start `shadow-proxy serve ARGS` and wait for its admin /healthz; killed after the test."""
    started: list[subprocess.Popen[bytes]] = []
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")

    def start(*args: str, admin_port: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--admin-listen", f"127.0.0.1:{admin_port}", *args],
            env=_env(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        wait_healthy(admin_port, process, log_path)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
    log.close()


async def test_serve_starts_embedded_redis_records_and_stops_it(upstreams, serve, tmp_path: Path) -> None:
    """Without a Redis URL, serve runs its own redis-server, records into it and stops it on SIGTERM."""
    incumbent = await upstreams(echo)
    port, admin = free_port(), free_port()
    process = serve("--listen", f"127.0.0.1:{port}", "--incumbent", incumbent.url, admin_port=admin)
    url_file = tmp_path / "state" / "shadow-proxy" / "redis" / "redis.url"
    redis_url = url_file.read_text().strip()
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{port}/v1/x", data=b"{}") as resp:
            assert resp.status == 200
    with redis.Redis.from_url(redis_url) as client:
        await eventually(lambda: client.xlen("{shadow}:records") == 1)
    redis_pid = next(p.pid for p in psutil.Process(process.pid).children() if "redis-server" in p.name())
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert not url_file.exists()
    assert not psutil.pid_exists(redis_pid) or psutil.Process(redis_pid).status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "state" / "shadow-proxy" / "redis" / "appendonly.aof").exists()


async def test_sigterm_finishes_in_flight_requests_and_flushes_records(upstreams, serve, redis_url) -> None:
    """SIGTERM under load: requests already in flight complete with 200 and every record is written."""
    arrived: list[str] = []
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if "x-shadow-request" not in request.headers:  # not an A/A copy (on by default at 5%)
            arrived.append(request.path)
        await release.wait()
        return web.json_response({"ok": True})

    incumbent = await upstreams(slow)
    candidate = await upstreams(echo)
    port, admin = free_port(), free_port()
    process = serve(
        "--listen",
        f"127.0.0.1:{port}",
        "--incumbent",
        incumbent.url,
        "--candidate",
        candidate.url,
        "--redis-url",
        redis_url,
        admin_port=admin,
    )
    async with aiohttp.ClientSession() as client:
        pending = [asyncio.ensure_future(client.post(f"http://127.0.0.1:{port}/v1/{i}", data=b"{}")) for i in range(10)]
        await eventually(lambda: len(arrived) == 10)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)  # let the signal land while all ten are in flight
        release.set()
        responses = await asyncio.gather(*pending)
        assert [r.status for r in responses] == [200] * 10
        for response in responses:
            response.release()
    assert await asyncio.to_thread(process.wait, 30) == 0
    with redis.Redis.from_url(redis_url) as client:
        stored = client.xrange("{shadow}:records")
    assert sorted(fields[b"request_id"] for _, fields in stored) == sorted(
        r.headers["x-request-id"].encode() for r in responses
    )


async def test_workers_share_one_port(upstreams, serve, redis_url) -> None:
    """--workers 2: two processes on one port, metrics summed across them, both exit cleanly on SIGTERM."""
    incumbent = await upstreams(echo)
    port, admin = free_port(), free_port()
    process = serve(
        "--listen",
        f"127.0.0.1:{port}",
        "--incumbent",
        incumbent.url,
        "--redis-url",
        redis_url,
        "--workers",
        "2",
        admin_port=admin,
    )

    def listeners() -> set[int]:
        found = set()
        for child in psutil.Process(process.pid).children():
            for conn in child.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    found.add(child.pid)
        return found

    await eventually(lambda: len(listeners()) == 2, within=30)
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.get(f"http://127.0.0.1:{port}/x", headers={"Connection": "close"}) as resp:
                assert resp.status == 200
        # Whichever worker answers the scrape, /metrics counts the requests of both.
        for _ in range(4):
            async with client.get(f"http://127.0.0.1:{admin}/metrics", headers={"Connection": "close"}) as resp:
                text = await resp.text()
            assert 'shadow_proxy_requests_total{code="200",route="/*",upstream="incumbent"} 20.0' in text
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0


def test_port_in_use_exits_1_with_a_message(tmp_path: Path) -> None:
    """A listener that cannot bind ends the process with exit 1 and says why."""
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--incumbent",
                "http://127.0.0.1:1",
                "--redis-url",
                "redis://127.0.0.1:1/0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()


async def test_workers_share_a_drawn_feedback_secret(upstreams, serve, redis_url, tmp_path: Path) -> None:
    """--workers 2 without canary.feedback_secret: serve draws one before spawning, so either worker accepts
    the feedback token the other issued, and says in its log that the secret is random."""
    incumbent = await upstreams(echo)
    config = tmp_path / "canary.toml"
    config.write_text("[canary]\nenabled = true\n[[canary.stage]]\nweight = 0.0\nmin_duration = 3600\n")
    port, admin = free_port(), free_port()
    process = serve(
        *("--config", str(config), "--listen", f"127.0.0.1:{port}", "--incumbent", incumbent.url),
        *("--redis-url", redis_url, "--workers", "2"),
        admin_port=admin,
    )
    close = {"Connection": "close"}  # a new connection each time: the kernel spreads them over both workers
    answers = []
    async with aiohttp.ClientSession() as client:
        for _ in range(16):
            async with client.post(f"http://127.0.0.1:{port}/v1/x", data=b"{}", headers=close) as resp:
                answers.append((resp.headers["x-request-id"], resp.headers["x-feedback-token"]))
        with redis.Redis.from_url(redis_url) as store:
            await eventually(lambda: len(store.keys("{shadow}:served:*")) == 16, within=10)
        statuses = []
        for request_id, token in answers:
            body = {"request_id": request_id, "score": 1, "token": token}
            async with client.post(f"http://127.0.0.1:{port}/_shadow/feedback", json=body, headers=close) as resp:
                statuses.append(resp.status)
    assert statuses == [200] * 16
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert "feedback_secret_random" in (tmp_path / "serve.log").read_text()

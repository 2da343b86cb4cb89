"""The recorder with a disk spool: a Redis outage longer than memory holds, and a proxy killed with SIGKILL,
lose no record; nothing is written twice to the aggregates."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import redis

from proxy.server import ProxyServer
from proxy.tools.embedded_redis import EmbeddedRedis, free_port

from .conftest import echo, eventually, make_config, records, wait_healthy

pytestmark = pytest.mark.slow


async def _send(port: int, count: int) -> int:
    answered = 0
    async with aiohttp.ClientSession() as session:
        for index in range(count):
            async with session.post(f"http://127.0.0.1:{port}/v1/x", json={"model": "m", "i": index}) as response:
                await response.read()
                answered += response.status == 200
    return answered


async def test_a_redis_outage_longer_than_memory_holds_loses_nothing(upstreams, tmp_path: Path) -> None:
    """A memory queue of 50 records, Redis down for 300 requests: all 300 wait on disk, none is dropped,
    and every one reaches Redis in order once it is back."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persist=False)  # down until started
    incumbent = await upstreams(echo)
    config = make_config(
        incumbent={"url": incumbent.url},
        record={
            "redis_url": server.url,
            "queue_max_records": 50,
            "spool_dir": str(tmp_path / "spool"),
            "socket_timeout": 0.5,
            "linger": 0.01,
        },
    )
    proxy = ProxyServer(config)
    await proxy.start()
    try:
        metrics = proxy.runtime.metrics
        assert await _send(proxy.port, 300) == 300
        await eventually(lambda: metrics.value("shadow_proxy_spool_records") == 300)
        assert metrics.value("shadow_proxy_records_dropped_total", reason="queue_full") == 0
        assert metrics.value("shadow_proxy_records_written_total") == 0
        await asyncio.to_thread(server.start)
        await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 300, within=30)
        assert metrics.value("shadow_proxy_spool_records") == 0
        client = redis.Redis.from_url(server.url)
        stored = records(client)
        client.close()
        assert [orjson_index(r) for r in stored] == list(range(300))  # all of them, in order
    finally:
        await proxy.stop()
        server.stop()


def orjson_index(record: dict[str, object]) -> int:
    body = record["body.request"]
    assert isinstance(body, bytes)
    found = re.search(rb'"i": ?(\d+)', body)
    assert found is not None
    return int(found.group(1))


def _metric(admin_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _serve(tmp_path: Path, redis_url: str, incumbent: str, admin_port: int, port: int) -> subprocess.Popen[bytes]:
    with (tmp_path / f"serve-{time.monotonic_ns()}.log").open("wb") as log:
        process = _popen(redis_url, incumbent, admin_port, port, tmp_path, log)
    wait_healthy(admin_port, process)
    return process


def _popen(
    redis_url: str, incumbent: str, admin_port: int, port: int, tmp_path: Path, log: object
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--incumbent",
            incumbent,
            "--redis-url",
            redis_url,
        ],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SHADOW_PROXY_RECORD_SPOOL_DIR": str(tmp_path / "spool"),
            "SHADOW_PROXY_RECORD_SOCKET_TIMEOUT": "0.5",
            "SHADOW_PROXY_COMPARE_NOISE_SAMPLE_RATE": "0",
        },
        stdout=log,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
    )


async def test_a_proxy_killed_with_sigkill_replays_its_spool_once(upstreams, tmp_path: Path) -> None:
    """Redis down, 200 answered requests, the proxy killed with SIGKILL: the next process on the same
    spool sends all 200 once Redis is up; none is lost, none appears twice."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persist=False)
    incumbent = await upstreams(echo)
    admin_port, port = free_port(), free_port()
    first = await asyncio.to_thread(_serve, tmp_path, server.url, incumbent.url, admin_port, port)
    second = None
    try:
        assert await _send(port, 200) == 200
        await eventually(lambda: _metric(admin_port, "shadow_proxy_spool_records") == 200, within=20)
        first.send_signal(signal.SIGKILL)
        first.wait()
        await asyncio.to_thread(server.start)
        second = await asyncio.to_thread(_serve, tmp_path, server.url, incumbent.url, admin_port, port)
        await eventually(lambda: _metric(admin_port, "shadow_proxy_records_written_total") == 200, within=30)
        assert _metric(admin_port, "shadow_proxy_spool_recovered_total") == 200
        client = redis.Redis.from_url(server.url)
        stored = records(client)
        client.close()
        ids = [r["meta"]["request_id"] for r in stored]  # type: ignore[index]
        assert len(ids) == 200 and len(set(ids)) == 200
        assert sorted(orjson_index(r) for r in stored) == list(range(200))
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        server.stop()


def test_a_spool_directory_that_cannot_be_used_exits_2_naming_the_key(tmp_path: Path) -> None:
    """A spool_dir that is a file: `serve` stops at startup with one line naming record.spool_dir, exit 2."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--incumbent",
            "http://127.0.0.1:9",
            "--redis-url",
            f"redis://127.0.0.1:{free_port()}/0",
        ],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SHADOW_PROXY_RECORD_SPOOL_DIR": str(blocker)},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.decode().splitlines() if "record.spool_dir" in line]
    assert len(errors) == 1 and "leave it empty" in errors[0]
    assert b"Unclosed" not in result.stderr and b"Traceback" not in result.stderr

"""Scale-out: two proxies and two comparator workers on one Redis, one of each restarted under load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import redis

from proxy.comparator.report_loader import load_report
from proxy.tools.embedded_redis import free_port

from .conftest import echo, eventually, make_config, wait_healthy


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SHADOW_PROXY_COMPARE_CLAIM_IDLE_MS": "500",
        "SHADOW_PROXY_COMPARE_BLOCK_MS": "200",
        "SHADOW_PROXY_COMPARE_BATCH_SIZE": "50",
    }
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", *args], env=env, stdout=output, stderr=subprocess.STDOUT
        )


def _healthy(admin: int) -> None:
    wait_healthy(admin)


async def test_records_and_totals_stay_exact_through_restarts(upstreams, redis_url, tmp_path: Path) -> None:
    """Every answered request is recorded exactly once and the report counts each pair once, although one
    proxy is restarted (SIGTERM, graceful) and one worker is killed (SIGKILL) and restarted mid-run."""
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    ports = [(free_port(), free_port()) for _ in range(2)]

    def proxy(index: int) -> subprocess.Popen[bytes]:
        port, admin = ports[index]
        process = _start(
            [
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
                "--incumbent",
                incumbent.url,
                "--candidate",
                candidate.url,
                "--redis-url",
                redis_url,
            ],
            tmp_path / f"proxy{index}.log",
        )
        _healthy(admin)
        return process

    def worker(name: str) -> subprocess.Popen[bytes]:
        return _start(["compare", "--redis-url", redis_url, "--consumer", name], tmp_path / f"{name}.log")

    proxies = [proxy(0), proxy(1)]
    workers = [worker("w1"), worker("w2")]
    answered: set[str] = set()
    attempted = 0
    try:
        async with aiohttp.ClientSession() as client:
            started = time.monotonic()
            restarted = killed = False
            while time.monotonic() - started < 6.0:
                attempted += 1
                request_id = f"req-{attempted}"
                port = ports[attempted % 2][0]
                try:
                    async with client.post(
                        f"http://127.0.0.1:{port}/v1/x", data=b'{"model": "m"}', headers={"X-Request-Id": request_id}
                    ) as resp:
                        await resp.read()
                        if resp.status == 200:
                            answered.add(request_id)
                except aiohttp.ClientError:
                    pass
                elapsed = time.monotonic() - started
                if elapsed > 2.0 and not restarted:
                    restarted = True
                    proxies[0].send_signal(signal.SIGTERM)
                    assert await asyncio.to_thread(proxies[0].wait, 30) == 0
                    proxies[0] = await asyncio.to_thread(proxy, 0)
                if elapsed > 3.0 and not killed:
                    killed = True
                    workers[0].send_signal(signal.SIGKILL)
                    workers[0].wait(10)
                    workers[0] = worker("w1")
        client_sync = redis.Redis.from_url(redis_url)

        def drained() -> bool:
            # Records reach Redis asynchronously (record.linger), then the comparators catch up.
            if client_sync.xlen("{shadow}:records") < len(answered):
                return False
            group = client_sync.xinfo_groups("{shadow}:records")[0]
            last = client_sync.xinfo_stream("{shadow}:records")["last-generated-id"]
            return group["pending"] == 0 and group["last-delivered-id"] == last

        await eventually(drained, within=60)
        recorded = [f[b"client_request_id"].decode() for _, f in client_sync.xrange("{shadow}:records")]
        client_sync.close()
    finally:
        for process in [*proxies, *workers]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    assert len(answered) > 200
    assert len(recorded) == len(set(recorded)), "a request was recorded twice"
    assert set(recorded) == answered, "answered and recorded requests differ"
    report = (await load_report(make_config(record={"redis_url": redis_url}), redis_url, since_seconds=3600)).as_json()
    assert report["summary"]["pairs"] == len(answered)

"""The comparator worker: at least once delivery with exactly-once counts, dead letters, reclaim, reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis
from aiohttp import web

from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker
from proxy.redis import AggregateWriter, Clients, Keys, Limits, RecordConsumer

from .conftest import echo, eventually, make_config


async def produce(upstreams, proxies, redis_url: str, n: int, handler=echo) -> Any:  # type: ignore[no-untyped-def]
    """n records written by the real proxy in front of two real upstreams."""
    incumbent = await upstreams(handler)
    candidate = await upstreams(handler)
    proxy = await proxies(
        incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"redis_url": redis_url}
    )
    semaphore = asyncio.Semaphore(20)
    async with aiohttp.ClientSession() as client:

        async def send(i: int) -> None:
            async with semaphore:
                async with client.post(
                    f"http://127.0.0.1:{proxy.port}/v1/x", data=b'{"model": "m"}', headers={"X-Request-Id": f"r{i}"}
                ) as resp:
                    await resp.read()

        await asyncio.gather(*(send(i) for i in range(n)))
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == n)
    return proxy


def _config(redis_url: str, **compare: Any):  # type: ignore[no-untyped-def]
    return make_config(record={"redis_url": redis_url}, compare=compare)


async def _burst(redis_url: str, **compare: Any):  # type: ignore[no-untyped-def]
    worker = Worker(_config(redis_url, **compare), redis_url)
    try:
        return await worker.run(burst=True)
    finally:
        await worker.close()


async def _pairs(redis_url: str) -> int:
    report = (await load_report(_config(redis_url), redis_url, since_seconds=3600)).as_json()
    return int(report["summary"]["pairs"])


async def test_a_record_delivered_twice_counts_once(upstreams, proxies, redis_url, redis_client) -> None:
    """Re-adding every record (as a recorder retry would) changes no total."""
    await produce(upstreams, proxies, redis_url, 30)
    first = await _burst(redis_url)
    assert (first.applied, first.duplicates) == (30, 0)
    for _, fields in redis_client.xrange("{shadow}:records"):
        redis_client.xadd("{shadow}:records", fields)
    second = await _burst(redis_url)
    assert (second.read, second.applied, second.duplicates) == (30, 0, 30)
    assert await _pairs(redis_url) == 30


async def test_poison_record_goes_to_dead_letter_and_the_group_goes_on(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """An unreadable entry is parked with its reason and acknowledged; the rest are counted."""
    await produce(upstreams, proxies, redis_url, 10)
    redis_client.xadd("{shadow}:records", {"meta": b"{not json", "v": b"1"})
    await produce(upstreams, proxies, redis_url, 0)
    progress = await _burst(redis_url)
    assert progress.dead_lettered == 1
    ((_, parked),) = redis_client.xrange("{shadow}:dead-letter")
    assert parked[b"meta"] == b"{not json" and b"JSONDecodeError" in parked[b"dead_letter.reason"]
    assert redis_client.xpending("{shadow}:records", "comparators")["pending"] == 0
    assert await _pairs(redis_url) == 10


async def test_entries_applied_but_not_acknowledged_are_reclaimed_without_double_counting(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """A worker that wrote its aggregates and died before XACK: the survivor reclaims, totals stay exact."""
    await produce(upstreams, proxies, redis_url, 40)
    config = _config(redis_url)
    from proxy.comparator.aggregate import contributions
    from proxy.comparator.parse import parse_record
    from proxy.comparator.worker import settings_from

    clients = Clients(redis_url, socket_timeout=5)
    dead = RecordConsumer(
        clients.get("comparator"), Keys("shadow"), group="comparators", consumer="dead", dead_letter_maxlen=100
    )
    aggregates = AggregateWriter(clients.get("comparator"), Keys("shadow"), limits=Limits(3600, 900, 100, 5))
    await dead.ensure_group()
    batch = await dead.read_new(25, 0)
    settings = settings_from(config)
    await aggregates.apply([c for _, fields in batch.entries for c in contributions(parse_record(fields), settings)])
    await clients.close()  # never acknowledged
    assert redis_client.xpending("{shadow}:records", "comparators")["pending"] == 25
    progress = await _burst(redis_url, claim_idle_ms=100)
    assert progress.reclaimed == 25 and progress.duplicates == 25
    assert redis_client.xpending("{shadow}:records", "comparators")["pending"] == 0
    assert await _pairs(redis_url) == 40


def _worker_process(redis_url: str, name: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SHADOW_PROXY_COMPARE_BATCH_SIZE": "20",
        "SHADOW_PROXY_COMPARE_CLAIM_IDLE_MS": "300",
        "SHADOW_PROXY_COMPARE_BLOCK_MS": "200",
    }
    with log.open("wb") as output:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "compare", "--redis-url", redis_url, "--consumer", name],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


async def test_two_workers_one_killed_mid_batch_totals_exact(
    upstreams, proxies, redis_url, redis_client, tmp_path: Path
) -> None:
    """SIGKILL one of two workers while it holds unacknowledged entries: the other finishes, totals exact."""
    total = 3000
    await produce(upstreams, proxies, redis_url, total)
    victim = _worker_process(redis_url, "victim", tmp_path / "victim.log")
    survivor = _worker_process(redis_url, "survivor", tmp_path / "survivor.log")
    try:

        def victim_holds_entries() -> bool:
            try:
                consumers = redis_client.xinfo_consumers("{shadow}:records", "comparators")
            except redis.ResponseError:  # the workers have not created the group yet
                return False
            return any(c["name"] == b"victim" and c["pending"] > 0 for c in consumers)

        await eventually(victim_holds_entries, within=30)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        def all_done() -> bool:
            group = redis_client.xinfo_groups("{shadow}:records")[0]
            return (
                group["pending"] == 0
                and group["last-delivered-id"] == redis_client.xinfo_stream("{shadow}:records")["last-generated-id"]
            )

        await eventually(all_done, within=60)
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)
    assert survivor.returncode == 0
    assert await _pairs(redis_url) == total


async def test_truncated_candidate_stream_is_an_error_for_that_arm(upstreams, proxies, redis_url) -> None:
    """An SSE answer cut before [DONE] counts as truncated_stream for the candidate only."""

    async def stream(request: web.Request, *, complete: bool) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if complete:
            await resp.write(b"data: [DONE]\n\n")
        return resp

    incumbent = await upstreams(lambda r: stream(r, complete=True))
    candidate = await upstreams(lambda r: stream(r, complete=False))
    proxy = await proxies(
        incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"redis_url": redis_url}
    )
    async with aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", data=b"{}") as resp:
                await resp.read()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 5)
    await _burst(redis_url)
    report = (await load_report(_config(redis_url), redis_url, since_seconds=3600)).as_json()
    errors = report["summary"]["errors"]
    assert errors["candidate"]["by_class"] == {"truncated_stream": 5}
    assert errors["incumbent"]["by_class"] == {} and errors["candidate_only"] == 5


async def test_health_key_has_a_ttl(upstreams, proxies, redis_url, redis_client) -> None:
    """A worker leaves a health key that expires unless it keeps beating."""
    await produce(upstreams, proxies, redis_url, 3)
    await _burst(redis_url, consumer="w-health", health_ttl=30)
    assert 0 < redis_client.ttl("{shadow}:worker:w-health") <= 30
    assert json.loads(redis_client.get("{shadow}:worker:w-health"))["applied"] == 3


async def test_report_command_and_admin_api_agree(upstreams, proxies, redis_url) -> None:
    """`shadow-proxy report --json`, the table form and GET /api/report describe the same pairs."""
    proxy = await produce(upstreams, proxies, redis_url, 12)
    await _burst(redis_url)
    env = {"PATH": os.environ.get("PATH", ""), "COLUMNS": "200"}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "report", "--json", "--redis-url", redis_url, "--since", "1h"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    cli = json.loads(result.stdout)
    assert cli["summary"]["pairs"] == 12 and cli["verdict"]["outcome"] == "inconclusive"
    table = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "report", "--redis-url", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert table.returncode == 0 and "12 pairs" in table.stdout and "INCONCLUSIVE" in table.stdout
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/api/report?since=1h") as resp:
            api = await resp.json()
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/api/report?since=soon") as resp:
            assert resp.status == 400
    assert api["summary"] == cli["summary"]
    with redis.Redis.from_url(redis_url) as client_:
        assert json.loads(client_.get("{shadow}:verdict"))["summary"]["pairs"] == 12

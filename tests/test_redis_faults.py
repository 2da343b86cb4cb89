"""The fault suite: Redis restarted, paused, busy, cut off or stalled under load, and every loop comes back.

Real processes throughout: redis-server (restarted on the same port, with its AOF), the proxy and its
canary loops, comparator workers, and a TCP fault proxy in front of Redis (``tests/faults.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from proxy.comparator.worker import Worker
from proxy.redis import Clients, Keys, RecordWriter
from proxy.server import ProxyServer
from proxy.tools.embedded_redis import EmbeddedRedis, free_port

from .conftest import echo, eventually, make_config
from .faults import FaultProxy

pytestmark = pytest.mark.slow

FAST_COMPARE = {"block_ms": 100, "claim_idle_ms": 500, "health_ttl": 2}


def _sections(redis_url: str, incumbent: str, candidate: str, **extra: Any) -> dict[str, Any]:
    return {
        "incumbent": {"url": incumbent},
        "candidate": {"url": candidate},
        "record": {"redis_url": redis_url, "retry_interval": 0.1, "socket_timeout": 0.5, "linger": 0.01},
        "compare": FAST_COMPARE,
        "canary": {
            "enabled": True,
            "evaluate_interval": 0.2,
            "lease_ttl": 1.0,
            "weight_poll_interval": 0.2,
            "stage": [{"weight": 0.0, "min_duration": 3600, "min_pairs": 1_000_000}],
        },
        **extra,
    }


class Load:
    """Open-loop traffic at a fixed rate; counts answers by status and transport errors."""

    def __init__(self, url: str, rate: float) -> None:
        self._url = url
        self._interval = 1.0 / rate
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession()
        self._runner = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        start = time.monotonic()
        sent = 0
        while not self._stop.is_set():
            task = asyncio.create_task(self._one(sent))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            sent += 1
            delay = start + sent * self._interval - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)

    async def _one(self, index: int) -> None:
        try:
            async with self._session.post(self._url, json={"model": "m", "prompt": f"p{index}"}) as response:
                await response.read()
                self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        except aiohttp.ClientError:
            self.errors += 1

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._runner is not None:
            await self._runner
        if self._tasks:
            await asyncio.gather(*self._tasks)
        await self._session.close()


async def _readyz(proxy: ProxyServer) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as response,
    ):
        data: dict[str, Any] = orjson.loads(await response.read())
        return data


def _loops_ok(proxy: ProxyServer) -> bool:
    return proxy.runtime.supervisor.all_ok and len(proxy.runtime.supervisor.status()) >= 3


async def _restart(server: EmbeddedRedis, down_for: float) -> None:
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(down_for)
    await asyncio.to_thread(server.start)


def _applied(client: redis.Redis) -> float:
    """Records counted in the aggregates (every window, every segment): each once, whatever was redelivered."""
    total = 0.0
    for key in client.scan_iter(match="{shadow}:agg:*"):
        total += float(client.hget(key, "n") or 0)
    return total


@dataclass
class Stack:
    """A proxy (with its canary loops) and comparator workers, all on one Redis."""

    proxy: ProxyServer
    workers: list[Worker]
    runs: list[asyncio.Task[Any]]


@contextlib.asynccontextmanager
async def _stack(upstreams: Any, redis_url: str, workers: int = 1, shards: int = 1) -> AsyncIterator[Stack]:
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    sections = _sections(redis_url, incumbent.url, candidate.url)
    sections["record"]["shards"] = shards
    config = make_config(**sections)
    proxy = ProxyServer(config)
    await proxy.start()
    started = [Worker(config, redis_url) for _ in range(workers)]
    stack = Stack(proxy, started, [asyncio.create_task(w.run()) for w in started])
    try:
        await eventually(lambda: _loops_ok(proxy))
        yield stack
    finally:
        for worker in started:
            worker.stop()
        await asyncio.gather(*stack.runs, return_exceptions=True)
        for worker in started:
            await worker.close()
        await proxy.stop()


async def test_redis_restarts_under_load_lose_nothing_uncounted_and_every_loop_comes_back(
    upstreams, tmp_path: Path
) -> None:
    """Redis down 10 s at 200 req/s, then restarted twice more: 0 live errors, records + counted drops =
    answered requests, every loop (recorder, canary weights and controller, two workers) up afterwards,
    and the aggregates count each record once."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persist=True)
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        async with _stack(upstreams, server.url, workers=2) as stack:
            await _restarts_under_load(stack, server, client)
    finally:
        client.close()
        server.stop()


async def _restarts_under_load(stack: Stack, server: EmbeddedRedis, client: redis.Redis) -> None:
    proxy, workers, runs = stack.proxy, stack.workers, stack.runs
    metrics = proxy.runtime.metrics
    async with Load(f"http://127.0.0.1:{proxy.port}/v1/completions", rate=200) as load:
        await asyncio.sleep(2)
        await _restart(server, 10.0)
        await eventually(lambda: metrics.value("shadow_proxy_loop_up", loop="recorder") == 1.0, within=20)
        for _ in range(2):
            await asyncio.sleep(1)
            await _restart(server, 0.5)
        await asyncio.sleep(2)
    assert load.errors == 0 and set(load.statuses) == {200}, (load.errors, load.statuses)
    answered = load.answered

    def settled() -> bool:
        written = metrics.value("shadow_proxy_records_written_total")
        dropped = sum(
            metrics.value("shadow_proxy_records_dropped_total", reason=r)
            for r in ("queue_full", "shutdown", "unserialisable")
        )
        return written + dropped == answered

    await eventually(settled, within=30)
    # The memory queue held the whole outage: nothing was dropped.
    assert metrics.value("shadow_proxy_records_written_total") == answered
    await eventually(lambda: _loops_ok(proxy), within=20)
    ready = await _readyz(proxy)
    assert all(loop["ok"] for loop in ready["loops"].values()), ready["loops"]
    assert {"recorder", "canary-weights", "canary-controller"} <= set(ready["loops"])
    assert ready["loops"]["recorder"]["last_outage"] is not None  # it says it was down, and when
    assert all(not run.done() for run in runs)  # both workers are still running
    await eventually(lambda: all(w.health.ok for w in workers), within=20)
    # Every record compared once: the aggregates hold exactly one count per answered request.
    await eventually(lambda: _applied(client) == answered, within=60)
    assert sum(w.progress.redis_errors for w in workers) > 0  # they did see the outage
    assert client.hgetall("{shadow}:records:lost") == {}  # and nothing was trimmed or deleted unread


async def test_a_stalled_and_then_dropped_redis_connection_is_survived(upstreams, redis_url, redis_client) -> None:
    """Through a TCP fault proxy: Redis stops answering (connections held open), then every connection is
    cut and new ones refused; the recorder, canary loops and a worker report it and resume afterwards."""
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    fault = await FaultProxy(host, int(port)).start()
    try:
        async with _stack(upstreams, fault.url) as stack:
            proxy, worker, run = stack.proxy, stack.workers[0], stack.runs[0]
            metrics = proxy.runtime.metrics
            async with Load(f"http://127.0.0.1:{proxy.port}/v1/completions", rate=100) as load:
                await asyncio.sleep(1)
                fault.stall()
                await eventually(lambda: not proxy.runtime.supervisor.all_ok, within=15)
                await eventually(lambda: not worker.health.ok, within=15)
                fault.drop()
                await asyncio.sleep(2)
                fault.restore()
                await asyncio.sleep(1)
            assert load.errors == 0 and set(load.statuses) == {200}, (load.errors, load.statuses)
            answered = load.answered
            await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == answered, within=30)
            await eventually(lambda: _loops_ok(proxy) and worker.health.ok, within=30)
            await eventually(lambda: _applied(redis_client) == load.answered, within=60)
            assert metrics.value("shadow_proxy_record_write_errors_total") > 0
            assert not run.done()
    finally:
        await fault.close()


async def test_busy_and_paused_redis_are_waited_out(upstreams, tmp_path: Path) -> None:
    """A script holding Redis (BUSY replies) and CLIENT PAUSE: loops report it, then resume by themselves."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), persist=False)
    server.start()
    admin = redis.Redis.from_url(server.url)
    busy_client = redis.Redis.from_url(server.url)
    try:
        async with _stack(upstreams, server.url) as stack:
            proxy, worker = stack.proxy, stack.workers[0]
            admin.config_set("lua-time-limit", 100)

            def busy() -> None:
                with contextlib.suppress(redis.RedisError):
                    busy_client.eval("local i = 0 while true do i = i + 1 end", 0)

            thread = threading.Thread(target=busy, daemon=True)
            async with Load(f"http://127.0.0.1:{proxy.port}/v1/completions", rate=50) as load:
                thread.start()
                await eventually(lambda: not worker.health.ok, within=15)
                reasons = {h["reason"] for h in proxy.runtime.supervisor.status().values()} | {worker.health.reason}
                await asyncio.to_thread(admin.script_kill)
                await asyncio.to_thread(thread.join, 10)
                await eventually(lambda: _loops_ok(proxy) and worker.health.ok, within=30)
                admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
                await asyncio.sleep(2.5)
            assert any(reason and "busy" in reason for reason in reasons), reasons
            assert load.errors == 0 and set(load.statuses) == {200}
            metrics = proxy.runtime.metrics
            await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == load.answered, within=30)
            await eventually(lambda: _loops_ok(proxy) and worker.health.ok, within=30)
    finally:
        busy_client.close()
        admin.close()
        server.stop()


def _record(index: int) -> dict[bytes, bytes]:
    """A minimal readable record (schema 2) with one candidate arm."""
    arm = {
        "upstream": "candidate",
        "role": "shadow",
        "status": 200,
        "ttfb_ms": 1.0,
        "duration_ms": 2.0,
        "headers": [["content-type", "application/json"]],
        "bytes": 2,
    }
    meta = {
        "v": 2,
        "request_id": f"r{index}",
        "time": time.time(),
        "route": "/v1/x",
        "arms": {"live": {**arm, "upstream": "incumbent", "role": "live"}, "shadow.candidate": arm},
    }
    return {
        b"v": b"2",
        b"request_id": f"r{index}".encode(),
        b"served_by": b"incumbent",
        b"meta": orjson.dumps(meta),
        b"body.live": b"{}",
        b"body.shadow.candidate": b"{}",
    }


async def _write(redis_url: str, count: int, *, maxlen: int, start: int = 0) -> None:
    clients = Clients(redis_url, socket_timeout=5)
    writer = RecordWriter(clients.get("records"), Keys("shadow"), maxlen=maxlen)
    for offset in range(start, start + count, 100):
        await writer.append([_record(i) for i in range(offset, min(offset + 100, start + count))])
    await clients.close()


async def test_records_trimmed_before_a_stalled_worker_reads_them_are_counted_exactly(redis_url, redis_client) -> None:
    """1,000 records into a stream trimmed to about 100 while the only worker is stalled: what it reads
    plus what it counts as trimmed is exactly 1,000, and /metrics' figures agree."""
    config = make_config(record={"redis_url": redis_url}, compare=FAST_COMPARE)
    worker = Worker(config, redis_url)
    await worker.records.ensure_group()
    await _write(redis_url, 50, maxlen=100)
    first = await worker.run(burst=True)  # reads the first 50
    assert first.read == 50 and first.trimmed == 0
    await _write(redis_url, 950, maxlen=100, start=50)  # the worker is stalled meanwhile
    progress = await worker.run(burst=True)
    await worker.close()
    assert progress.read + progress.trimmed == 1000
    assert progress.trimmed > 800  # most of them were trimmed unread
    assert int(redis_client.hget("{shadow}:records:lost", "trimmed:comparators")) == progress.trimmed
    assert int(redis_client.get("{shadow}:records:seq")) == 1000
    assert int(redis_client.hget("{shadow}:records:delivered", "comparators")) == 1000


async def test_records_trimmed_while_pending_are_counted_when_reclaimed(redis_url, redis_client) -> None:
    """A worker reads 30 entries and dies; 500 more push them out of the stream before anyone reclaims
    them: the survivor counts the 30 as deleted (Redis 6.2 returns them without fields) and acks them."""
    config = make_config(record={"redis_url": redis_url}, compare={**FAST_COMPARE, "claim_idle_ms": 100})
    dead = Worker(make_config(record={"redis_url": redis_url}, compare={**FAST_COMPARE, "consumer": "dead"}), redis_url)
    await dead.records.ensure_group()
    await _write(redis_url, 30, maxlen=50)
    batch = await dead.records.read_new(30, 0)  # delivered, never acknowledged
    await dead.close()
    assert len(batch.entries) == 30
    await _write(redis_url, 500, maxlen=50, start=30)
    await asyncio.sleep(0.2)
    survivor = Worker(config, redis_url)
    progress = await survivor.run(burst=True)
    await survivor.close()
    assert progress.deleted == 30
    assert int(redis_client.hget("{shadow}:records:lost", "deleted:comparators")) == 30
    assert redis_client.xpending("{shadow}:records", "comparators")["pending"] == 0
    assert progress.read + progress.trimmed == 500


async def test_a_poison_record_is_dead_lettered_and_the_worker_lives_on(redis_url, redis_client) -> None:
    """A pair nested about 1,000 levels deep (and a record of the wrong types) no longer kills workers
    in turn: each is dead-lettered with its reason, and the records after them are compared."""
    deep = b"[" * 990 + b"1" + b"]" * 990
    poison = {**_record(0), b"body.live": b'{"choices": [{"message": {"content": "x"}}], "x": ' + deep + b"}"}
    poison[b"body.shadow.candidate"] = poison[b"body.live"]
    wrong = {**_record(1), b"meta": orjson.dumps({"v": 2, "request_id": 5, "time": "soon", "arms": []})}
    clients = Clients(redis_url, socket_timeout=5)
    writer = RecordWriter(clients.get("records"), Keys("shadow"), maxlen=1000)
    await writer.append([poison, wrong, *(_record(i) for i in range(2, 12))])
    await clients.close()
    worker = Worker(make_config(record={"redis_url": redis_url}, compare=FAST_COMPARE), redis_url)
    progress = await worker.run(burst=True)
    await worker.close()
    assert progress.read == 12
    assert progress.applied >= 10
    dead = redis_client.xrange("{shadow}:dead-letter")
    reasons = [fields[b"dead_letter.reason"].decode() for _, fields in dead]
    assert len(dead) + progress.applied == 12, reasons
    assert redis_client.xpending("{shadow}:records", "comparators")["pending"] == 0


def test_nothing_outside_the_redis_package_imports_redis() -> None:
    """One seam: every Redis command goes through proxy/redis/."""
    root = Path(__file__).resolve().parent.parent / "proxy"
    offenders = []
    for path in root.rglob("*.py"):
        if path.is_relative_to(root / "redis"):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import redis", "from redis")):
                offenders.append(f"{path.relative_to(root)}: {stripped}")
    assert offenders == []

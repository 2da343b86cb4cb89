"""record.shards: records spread over N streams (one hash tag, so one Cluster slot, each), every request
counted once whatever N is, no key holding more than its share of the records, feedback joined on a
sharded record, losses and reclaims per shard; on one redis-server and on the real three-master cluster."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis.crc import key_slot

from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker
from proxy.config import ConfigError, load_config
from proxy.redis import AggregateReader, Clients, Keys, RecordWriter
from proxy.server import ProxyServer

from .conftest import echo, eventually, make_config
from .test_feedback import _answered, _canary, _post
from .test_redis_faults import FAST_COMPARE, _record

pytestmark = pytest.mark.slow

MARKER = re.compile(rb"marker-(\d+)-end")


@pytest.fixture(params=["server", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """A flushed single redis-server, or the flushed three-master cluster."""
    return str(request.getfixturevalue("redis_url" if request.param == "server" else "cluster_url"))


def _clients(url: str) -> Iterator[redis.Redis]:
    """Plain clients on every node holding data: the server, or each master of the cluster."""
    if "+cluster://" not in url:
        yield redis.Redis.from_url(url)
        return
    seed = url.split("://", 1)[1].split(",")[0]
    host, port = seed.rsplit(":", 1)
    with redis.Redis(host=host, port=int(port)) as client:
        ports = sorted({int(s[2][1]) for s in client.execute_command("CLUSTER", "SLOTS")})
    for master in ports:
        yield redis.Redis(host=host, port=master)


def _everything(url: str) -> dict[bytes, bytes]:
    """Every key of every node, with all of its content as one byte string."""
    found: dict[bytes, bytes] = {}
    for client in _clients(url):
        with client:
            for key in client.scan_iter(count=500):
                kind = client.type(key)
                if kind == b"stream":
                    parts = [v for _, fields in client.xrange(key) for kv in fields.items() for v in kv]
                elif kind == b"hash":
                    parts = [v for kv in client.hgetall(key).items() for v in kv]
                elif kind == b"list":
                    parts = client.lrange(key, 0, -1)
                elif kind == b"zset":
                    parts = client.zrange(key, 0, -1)
                else:
                    parts = [client.get(key) or b""]
                found[key] = b"\n".join(parts)
    return found


def test_one_shard_keeps_every_key_and_n_shards_spread_per_record_keys_over_n_slots() -> None:
    """shards = 1 names every key as before sharding existed; with 4 the per-record keys take one tag per
    shard (4 different Cluster slots) and the deployment's own keys keep {shadow}."""
    one, four = Keys("shadow", "records", 1), Keys("shadow", "records", 4)
    assert Keys("shadow") == one and one.all_shards() == [one]
    names = [
        one.records, one.records_seq, one.delivered, one.lost, one.dead_letter, one.windows, one.segments,
        one.aggregate(60, "s"), one.pairs(60, "s"), one.examples(60, "s"), one.example_data(60, "s"),
        one.seen("r|c"), one.served("r"), one.feedback_seen("r"), one.feedback(60),
        one.verdict, one.worker("w"), one.spend("c", 1), one.canary_state, one.canary_events, one.canary_lease,
        one.canary_channel,
    ]  # fmt: skip
    assert names == [
        "{shadow}:records", "{shadow}:records:seq", "{shadow}:records:delivered", "{shadow}:records:lost",
        "{shadow}:dead-letter", "{shadow}:windows", "{shadow}:segments", "{shadow}:agg:60:s", "{shadow}:pairs:60:s",
        "{shadow}:ex:60:s", "{shadow}:exdata:60:s", "{shadow}:seen:r|c", "{shadow}:served:r", "{shadow}:fbseen:r",
        "{shadow}:fb:60", "{shadow}:verdict", "{shadow}:worker:w", "{shadow}:spend:c:1", "{shadow}:canary:state",
        "{shadow}:canary:events", "{shadow}:canary:lease", "{shadow}:canary",
    ]  # fmt: skip
    assert one.shard_of("anything") == 0
    shards = four.all_shards()
    assert [s.records for s in shards] == [f"{{shadow:s{k}}}:records" for k in range(4)]
    assert [s.aggregate(60, "x") for s in shards] == [f"{{shadow:s{k}}}:agg:60:x" for k in range(4)]
    assert len({key_slot(s.records.encode()) for s in shards}) == 4
    for shard in shards:  # each shard's keys share its slot: its scripts and pipelines are legal on a cluster
        slots = {key_slot(k.encode()) for k in (shard.records, shard.records_seq, shard.lost, shard.windows)}
        assert slots == {key_slot(shard.served("r").encode())}
        assert shard.verdict == "{shadow}:verdict" and shard.canary_state == "{shadow}:canary:state"
    assert four.shard_of("0123abc") == zlib.crc32(b"0123abc") % 4
    assert four.for_record("0123abc").served("0123abc") == f"{{shadow:s{zlib.crc32(b'0123abc') % 4}}}:served:0123abc"


@pytest.mark.parametrize("value", [0, -1, 1025])
def test_shards_out_of_range_is_a_one_line_config_error(value: int, tmp_path: Path) -> None:
    """record.shards below 1 (or above 1024) is refused, naming the key; check-config exits 2 with one line."""
    with pytest.raises(ConfigError, match=rf"invalid config key record\.shards = {value}: "):
        load_config(None, environ={"SHADOW_PROXY_RECORD_SHARDS": str(value)})
    path = tmp_path / "config.toml"
    path.write_text(f"[record]\nshards = {value}\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"record.shards = {value}" in result.stderr, result.stderr


@contextlib.asynccontextmanager
async def _loop(upstreams: Any, url: str, shards: int) -> AsyncIterator[tuple[ProxyServer, list[Worker]]]:
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    config = make_config(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        record={"redis_url": url, "shards": shards, "linger": 0.01},
        compare=FAST_COMPARE,
    )
    proxy = ProxyServer(config)
    await proxy.start()
    workers = [Worker(config, url) for _ in range(2)]
    runs = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield proxy, workers
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*runs, return_exceptions=True)
        for worker in workers:
            await worker.close()
        await proxy.stop()


async def _traffic(proxy: ProxyServer, count: int) -> None:
    """``count`` requests, 16 at a time, each body with its own marker; every one answered 200."""
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one(index: int) -> None:
            async with gate:
                body = {"model": "m", "prompt": f"marker-{index}-end"}
                async with session.post(f"http://127.0.0.1:{proxy.port}/v1/completions", json=body) as response:
                    await response.read()
                    assert response.status == 200

        await asyncio.gather(*(one(i) for i in range(count)))


async def _compared(upstreams: Any, url: str, shards: int, count: int) -> dict[str, Any]:
    """``count`` requests through a proxy with ``shards`` and two workers; the report once every one is compared."""
    config = make_config(record={"redis_url": url, "shards": shards})
    async with _loop(upstreams, url, shards) as (proxy, workers):
        await _traffic(proxy, count)
        metrics = proxy.runtime.metrics
        await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == count, within=30)
        reader = AggregateReader(proxy.runtime.clients.get("control"), Keys("shadow", "records", shards))  # type: ignore[union-attr]

        async def done() -> bool:
            backlog = await reader.backlog("comparators")
            return backlog["lag"] == 0 and backlog["pending"] == 0 and sum(w.progress.read for w in workers) >= count

        for _ in range(300):
            if await done():
                break
            await asyncio.sleep(0.1)
        assert await done()
        backlog = await reader.backlog("comparators")
        assert backlog["added"] == count and backlog["length"] == count and backlog["trimmed"] == 0
        assert all(w.progress.read > 0 for w in workers)  # both workers took a share
        assert sum(w.progress.applied for w in workers) == count and sum(w.progress.duplicates for w in workers) == 0
        report = (await load_report(config, url, since_seconds=3600)).as_json()
    # The counts (not the timings, which differ from run to run) of the report and of the merged windows.
    figures = {name: report["summary"][name] for name in ("records", "pairs", "unpaired", "errors", "latency_censored")}
    return {**figures, "n": sum(w.counters.get("n", 0.0) for w in await _windows(url, shards))}


async def _windows(url: str, shards: int) -> list[Any]:
    clients = Clients(url, socket_timeout=5)
    try:
        return await AggregateReader(clients.get("control"), Keys("shadow", "records", shards)).load(0, 2e9, 0)
    finally:
        await clients.close()


async def test_four_shards_count_every_request_once_and_no_key_holds_more_than_its_share(upstreams, url) -> None:
    """400 requests through a proxy with shards = 4 and two workers: four streams, each holding between
    half and twice its quarter of the records, no other key holding any request body, the report counting
    every request once; the same traffic with shards = 1 gives the same figures."""
    count = 400
    four = await _compared(upstreams, url, 4, count)
    contents = _everything(url)
    streams = {f"{{shadow:s{k}}}:records".encode() for k in range(4)}
    holding = {key: {m for m in MARKER.findall(value)} for key, value in contents.items()}
    holding = {key: found for key, found in holding.items() if found}
    assert set(holding) == streams, sorted(holding)  # record bodies are in the four streams and nowhere else
    assert len(set().union(*holding.values())) == count
    for key in streams:
        assert count / 4 / 2 <= len(holding[key]) <= 2 * count / 4, {k: len(v) for k, v in holding.items()}
    assert not any(key.startswith(b"{shadow}:records") for key in contents)  # the one-shard layout is unused
    assert four["pairs"] == count and four["n"] == count
    for client in _clients(url):
        with client:
            client.flushall()
    one = await _compared(upstreams, url, 1, count)
    assert one == four


async def test_feedback_joins_on_a_sharded_record(upstreams, proxies, url) -> None:
    """With shards = 4 the served marker of each answer is in its record's shard; feedback with the answer's
    token finds it (once: a second is 409), and the report's feedback counters merge the shards."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": url, "shards": 4}, canary=_canary())
    answered = await _answered(proxy, 12)
    keys = Keys("shadow", "records", 4)
    for request_id, token in answered:
        status, body = await _post(proxy, {"request_id": request_id, "score": 1, "token": token})
        assert (status, body) == (200, {"request_id": request_id, "arm": "incumbent"})
        status, _ = await _post(proxy, {"request_id": request_id, "score": 0, "token": token})
        assert status == 409
    contents = _everything(url)
    served = {key for key in contents if b":served:" in key}
    assert served == {keys.for_record(t.rsplit(".", 1)[0]).served(t.rsplit(".", 1)[0]).encode() for _, t in answered}
    assert len({key.split(b"}")[0] for key in served}) > 1  # spread over shards
    clients = Clients(url, socket_timeout=5)
    try:
        now = time.time()  # feedback windows are compare.window_seconds (60 s) long
        feedback = await AggregateReader(clients.get("control"), keys).feedback(now - 600, now + 60, 60)
    finally:
        await clients.close()
    assert feedback["n:incumbent"] == 12 and feedback["sum:incumbent"] == 12


async def test_losses_and_reclaims_are_counted_per_shard_and_summed(url) -> None:
    """Four shards trimmed to about 50 entries each: what a worker reads plus what it counts as trimmed is
    every record, per shard and in the summed backlog; a dead worker's pending entries on every shard are
    reclaimed by the survivor and counted once."""
    shards = 4
    keys = Keys("shadow", "records", shards)
    compare = {**FAST_COMPARE, "claim_idle_ms": 100}
    config = make_config(record={"redis_url": url, "shards": shards}, compare=compare)
    clients = Clients(url, socket_timeout=5)
    writer = RecordWriter(clients.get("records"), keys, maxlen=50)
    dead = Worker(
        make_config(record={"redis_url": url, "shards": shards}, compare={**compare, "consumer": "dead"}), url
    )
    for shard in dead.shards:
        await shard.ensure_group()
    await writer.append([_record(i) for i in range(40)])
    taken = [len((await shard.read_new(100, 0)).entries) for shard in dead.shards]  # delivered, never acked
    await dead.close()
    assert sum(taken) == 40 and sum(1 for t in taken if t) > 1
    reader = AggregateReader(clients.get("control"), keys)
    assert (await reader.backlog("comparators"))["pending"] == 40
    await asyncio.sleep(0.2)
    survivor = Worker(config, url)
    progress = await survivor.run(burst=True)
    assert (progress.reclaimed, progress.read, progress.applied) == (40, 40, 40)
    total = 40 + 20 * 100
    for offset in range(40, total, 100):  # the survivor is stalled meanwhile
        await writer.append([_record(i) for i in range(offset, offset + 100)])
    progress = await survivor.run(burst=True)  # the same Progress, now over both runs
    await survivor.close()
    assert progress.read + progress.trimmed == total
    assert progress.trimmed > total / 2  # most were trimmed unread (each stream keeps about 50 to 150)
    assert progress.applied == progress.read and progress.duplicates == 0
    backlog = await reader.backlog("comparators")
    assert {k: v for k, v in backlog.items() if k != "length"} == {
        "added": total,
        "lag": 0,
        "pending": 0,
        "trimmed": progress.trimmed,
        "deleted": 0,
    }
    control = clients.get("control")
    per_shard = []
    for shard in keys.all_shards():
        lost = await control.hget(shard.lost, "trimmed:comparators")  # type: ignore[misc]
        seq = await control.get(shard.records_seq)  # type: ignore[misc]
        per_shard.append((int(lost or 0), int(seq)))
    assert sum(lost for lost, _ in per_shard) == progress.trimmed
    assert sum(seq for _, seq in per_shard) == total and all(lost > 0 for lost, _ in per_shard)
    windows = await reader.load(0, 2e9, 0)
    assert sum(w.counters.get("n", 0.0) for w in windows) == progress.read  # each read record counted once
    await clients.close()

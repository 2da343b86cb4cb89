"""The whole loop on a real Redis Cluster: proxy -> records stream -> two comparator workers -> report,
and the master of the deployment's slot killed under load (its replica promoted) with nothing lost uncounted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import orjson
import pytest
import redis

from proxy.comparator.report_loader import load_report
from proxy.redis import Keys

from .cluster import LocalCluster
from .conftest import eventually, make_config
from .test_redis_faults import Load, Stack, _loops_ok, _readyz, _stack

pytestmark = pytest.mark.slow

RECORDS = "{shadow}:records"
T = TypeVar("T")


def _on_master(cluster: LocalCluster) -> redis.Redis:
    """A plain client on whichever master serves the deployment's slot now."""
    return cluster.master_of(RECORDS).client()


def _applied(cluster: LocalCluster) -> float:
    """Records counted in the aggregates (every window and segment)."""
    with _on_master(cluster) as client:
        return sum(float(client.hget(key, "n") or 0) for key in client.scan_iter(match="{shadow}:agg:*"))


def _recorded_ids(cluster: LocalCluster) -> set[bytes]:
    with _on_master(cluster) as client:
        return {fields[b"request_id"] for _, fields in client.xrange(RECORDS)}


def _settled(stack: Stack, answered: int) -> bool:
    metrics = stack.proxy.runtime.metrics
    written = metrics.value("shadow_proxy_records_written_total")
    dropped = sum(
        metrics.value("shadow_proxy_records_dropped_total", reason=r)
        for r in ("queue_full", "shutdown", "unserialisable")
    )
    return written + dropped == answered


async def _get(stack: Stack, path: str) -> str:
    url = f"http://127.0.0.1:{stack.proxy.admin_port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.text()


async def _api_report(stack: Stack) -> dict[str, object]:
    data: dict[str, object] = orjson.loads(await _get(stack, "/api/report"))
    return data


async def test_the_whole_loop_runs_on_a_cluster(upstreams, redis_cluster: LocalCluster, cluster_url: str) -> None:
    """200 requests through the proxy (canary loops running) land in the stream on the slot's master, two
    workers compare each once, and both `report` and /api/report count every pair; /readyz says Redis is ok."""
    async with _stack(upstreams, cluster_url, workers=2) as stack:
        async with Load(f"http://127.0.0.1:{stack.proxy.port}/v1/completions", rate=100) as load:
            await eventually(lambda: load.answered >= 200, within=20)
        assert load.errors == 0 and set(load.statuses) == {200}
        answered = load.answered
        await eventually(lambda: _settled(stack, answered), within=20)
        assert stack.proxy.runtime.metrics.value("shadow_proxy_records_written_total") == answered
        assert len(_recorded_ids(redis_cluster)) == answered
        await eventually(lambda: _applied(redis_cluster) == answered, within=30)
        assert all(worker.progress.read > 0 for worker in stack.workers)  # both workers took a share
        ready = await _readyz(stack.proxy)
        assert ready["checks"]["redis"]["ok"] is True, ready
        assert all(loop["ok"] for loop in ready["loops"].values()), ready["loops"]
        exposition = await _get(stack, "/metrics")  # reads backlog, worker health keys, verdict from the cluster
        assert "shadow_proxy_comparator_lag 0.0" in exposition, exposition
        summary = (await _api_report(stack))["summary"]
        assert isinstance(summary, dict) and summary["pairs"] == answered
    config = make_config(record={"redis_url": cluster_url})
    report = (await load_report(config, cluster_url, since_seconds=3600)).as_json()
    assert report["summary"]["pairs"] == answered
    with _on_master(redis_cluster) as client:
        assert client.hgetall("{shadow}:records:lost") == {}
        assert client.get("{shadow}:canary:state") is not None  # the controller created the canary state


async def test_the_slots_master_killed_under_load_fails_over_and_nothing_is_lost_uncounted(
    upstreams, tmp_path: Path
) -> None:
    """At 100 requests/s the master holding every key is SIGKILLed; its replica takes over (node timeout
    1 s). The live path answers every request, each answered request is in the stream on the new master
    (the recorder's batches waited for the replica), the two workers count each once, and every loop
    (recorder, canary weights and controller, workers) says it was down and is up again."""
    cluster = LocalCluster(tmp_path / "cluster").start()
    try:
        async with _stack(upstreams, cluster.url, workers=2) as stack:
            victim = cluster.master_of(RECORDS)
            promoted = cluster.replicas_of(victim)[0]
            async with Load(f"http://127.0.0.1:{stack.proxy.port}/v1/completions", rate=100) as load:
                await asyncio.sleep(2)
                await asyncio.to_thread(victim.kill)
                assert await asyncio.to_thread(cluster.wait_failover, RECORDS, victim) is promoted
                await eventually(lambda: _loops_ok(stack.proxy), within=30)
                await asyncio.sleep(2)  # traffic on the new master
            await _check_failover(stack, cluster, load)
    finally:
        cluster.stop()


async def test_with_four_shards_a_master_killed_under_load_fails_over_and_nothing_is_lost_uncounted(
    upstreams, tmp_path: Path
) -> None:
    """record.shards = 4 on the three-master cluster: the master serving shard 0's slot (and whatever other shards
    share it) is SIGKILLed at 100 requests/s. Every answered request is in exactly one shard stream on whichever
    master serves it now, the two workers count each once over the four shards, and nothing is pending or lost."""
    shards = Keys("shadow", "records", 4).all_shards()
    cluster = LocalCluster(tmp_path / "cluster").start()
    try:
        async with _stack(upstreams, cluster.url, workers=2, shards=4) as stack:
            victim = cluster.master_of(shards[0].records)
            promoted = cluster.replicas_of(victim)[0]
            async with Load(f"http://127.0.0.1:{stack.proxy.port}/v1/completions", rate=100) as load:
                await asyncio.sleep(2)
                await asyncio.to_thread(victim.kill)
                assert await asyncio.to_thread(cluster.wait_failover, shards[0].records, victim) is promoted
                await eventually(lambda: _loops_ok(stack.proxy), within=30)
                await asyncio.sleep(2)
            assert load.errors == 0 and set(load.statuses) == {200}, (load.errors, load.statuses)
            answered = load.answered
            metrics = stack.proxy.runtime.metrics
            await eventually(lambda: _settled(stack, answered), within=30)
            assert metrics.value("shadow_proxy_records_written_total") == answered
            assert metrics.value("shadow_proxy_record_write_errors_total") > 0

            def per_shard(read: Callable[[redis.Redis, Keys], T]) -> list[T]:
                results = []
                for keys in shards:
                    with cluster.master_of(keys.records).client() as client:
                        results.append(read(client, keys))
                return results

            def ids(client: redis.Redis, keys: Keys) -> set[bytes]:
                return {fields[b"request_id"] for _, fields in client.xrange(keys.records)}

            def applied(client: redis.Redis, keys: Keys) -> float:
                return sum(float(client.hget(k, "n") or 0) for k in client.scan_iter(match=f"{keys.tag}:agg:*"))

            recorded = per_shard(ids)
            assert sum(len(found) for found in recorded) == len(set().union(*recorded)) == answered
            assert all(recorded), [len(found) for found in recorded]  # every shard took records
            await eventually(lambda: sum(per_shard(applied)) == answered, within=60)
            assert per_shard(lambda client, keys: client.hgetall(keys.lost)) == [{}] * 4
            pending = per_shard(lambda client, keys: client.xpending(keys.records, "comparators")["pending"])
            assert pending == [0] * 4
    finally:
        cluster.stop()


async def _check_failover(stack: Stack, cluster: LocalCluster, load: Load) -> None:
    proxy, workers = stack.proxy, stack.workers
    metrics = proxy.runtime.metrics
    assert load.errors == 0 and set(load.statuses) == {200}, (load.errors, load.statuses)
    answered = load.answered
    await eventually(lambda: _settled(stack, answered), within=30)
    assert metrics.value("shadow_proxy_records_written_total") == answered  # the queue held the outage
    assert metrics.value("shadow_proxy_record_write_errors_total") > 0  # and there was one
    # A batch cut off mid-flight is retried, so an entry may be there twice; every request is there.
    assert len(_recorded_ids(cluster)) == answered
    await eventually(lambda: _applied(cluster) == answered, within=60)  # each counted once
    await eventually(lambda: _loops_ok(proxy) and all(w.health.ok for w in workers), within=30)
    ready = await _readyz(proxy)
    assert ready["checks"]["redis"]["ok"] is True, ready
    assert {"recorder", "canary-weights", "canary-controller"} <= set(ready["loops"])
    assert all(loop["ok"] for loop in ready["loops"].values()), ready["loops"]
    assert ready["loops"]["recorder"]["last_outage"] is not None
    assert all(not run.done() for run in stack.runs)
    assert sum(w.progress.redis_errors for w in workers) > 0
    with _on_master(cluster) as client:
        assert client.hgetall("{shadow}:records:lost") == {}
        assert client.xpending(RECORDS, "comparators")["pending"] == 0

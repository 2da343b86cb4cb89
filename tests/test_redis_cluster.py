"""Every command path of ``proxy/redis/`` on a real Redis Cluster (three masters, one replica each).

The deployment's keys share one hash tag, so they live on one master; these tests check that each
path (scripts, pipelines, blocking reads, pub/sub, scans) is routed there and survives redirections.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis

from proxy.canary.state import CanaryState, Transition
from proxy.redis import FEEDBACK_DUPLICATE, FEEDBACK_STORED, AggregateReader, CanaryStore, Clients, Keys, RecordWriter
from proxy.redis.canary import Subscription
from proxy.redis.client import REPLICA_WAIT_MS, StoreUnavailable, connect
from proxy.redis.consumer import RecordConsumer
from proxy.redis.records import read_records

from .cluster import LocalCluster, Node

KEYS = Keys("shadow")


def _fields(index: int, served_by: bytes = b"incumbent") -> dict[bytes, bytes]:
    return {b"request_id": f"r{index}".encode(), b"served_by": served_by, b"meta": b"{}"}


def _master_client(cluster: LocalCluster) -> redis.Redis:
    """A plain client on the master that holds the deployment's slot (to check what was written)."""
    return cluster.master_of(KEYS.records).client()


async def test_a_cluster_url_gives_a_cluster_client_that_sees_every_seed(cluster_url: str) -> None:
    """redis+cluster:// builds a RedisCluster; it reads the whole topology from its seeds."""
    client = connect(cluster_url, socket_timeout=2)
    try:
        assert type(client).__name__ == "RedisCluster"
        await client.initialize()
        assert len(client.get_primaries()) == 3 and len(client.get_replicas()) == 3
    finally:
        await client.aclose()


async def test_records_are_appended_numbered_marked_and_replicated(redis_cluster: LocalCluster, cluster_url) -> None:
    """The recorder's script and served markers run in one cluster pipeline; when it answers, the replica
    has them too (WAIT); spend sync and the readiness ping work on the slot's master."""
    clients = Clients(cluster_url, socket_timeout=2)
    writer = RecordWriter(clients.get("records"), KEYS, maxlen=1000, served_ttl=60)
    try:
        await writer.append([_fields(i) for i in range(50)])
        await writer.append([_fields(i, b"candidate") for i in range(50, 60)])
        totals = await writer.sync_spend("cand", {100: 1.5, 101: 2.0}, [99, 100, 101], ttl=60)
        assert totals == {100: 1.5, 101: 2.0}
        assert await writer.ping() == (True, "ok")
        last = await read_records(clients.get("control"), KEYS, last=5, since=None)  # what `replay` reads
        assert [fields[b"request_id"] for _, fields in last] == [f"r{i}".encode() for i in range(55, 60)]
        master = redis_cluster.master_of(KEYS.records)
        replica = redis_cluster.replicas_of(master)[0]
        for node in (master, replica):
            with node.client() as plain:
                if node is replica:
                    plain.execute_command("READONLY")
                entries = plain.xrange(KEYS.records)
                assert [int(fields[b"seq"]) for _, fields in entries] == list(range(1, 61))
                assert plain.get(KEYS.served("r3")) == b"incumbent"
                assert plain.get(KEYS.served("r55")) == b"candidate"
    finally:
        await clients.close()


async def test_a_batch_waits_for_the_replica_and_stands_without_it(redis_cluster: LocalCluster, cluster_url) -> None:
    """With the slot's replica frozen (DEBUG SLEEP), a batch is answered after the WAIT timeout, not before,
    and is stored all the same; once the replica is back, batches are quick again."""
    clients = Clients(cluster_url, socket_timeout=5)
    writer = RecordWriter(clients.get("records"), KEYS, maxlen=1000)
    replica = redis_cluster.replicas_of(redis_cluster.master_of(KEYS.records))[0]
    try:
        await writer.append([_fields(0)])
        with replica.client() as frozen:
            sleeping = asyncio.create_task(asyncio.to_thread(frozen.execute_command, "DEBUG", "SLEEP", 1.5))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await writer.append([_fields(1)])
            waited = time.monotonic() - started
            await sleeping
        assert REPLICA_WAIT_MS / 1000 * 0.9 <= waited < 1.4
        started = time.monotonic()
        await writer.append([_fields(2)])
        assert time.monotonic() - started < REPLICA_WAIT_MS / 1000 / 2
        with _master_client(redis_cluster) as plain:
            assert plain.xlen(KEYS.records) == 3
    finally:
        await clients.close()


async def test_a_consumer_reads_blocks_reclaims_counts_losses_and_acks(cluster_url, redis_cluster) -> None:
    """The consumer group paths on the cluster: the read script, XREAD BLOCK woken by a new record,
    XAUTOCLAIM with entries trimmed while pending (counted), the pending sweep, dead letters, backlog."""
    clients = Clients(cluster_url, socket_timeout=5)
    client = clients.get("comparator")
    writer = RecordWriter(clients.get("records"), KEYS, maxlen=20)

    def consumer(name: str) -> RecordConsumer:
        return RecordConsumer(client, KEYS, group="comparators", consumer=name, dead_letter_maxlen=100)

    try:
        first, second = consumer("a"), consumer("b")
        await first.ensure_group()
        await first.ensure_group()  # BUSYGROUP is not an error
        assert (await first.read_new(10, 0)).entries == []
        later = asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(writer.append([_fields(0)])))
        started = time.monotonic()
        batch = await first.read_new(10, 5000)  # blocks on XREAD until the append lands
        later.cancel()
        assert [f[b"request_id"] for _, f in batch.entries] == [b"r0"] and time.monotonic() - started < 4
        await writer.append([_fields(i) for i in range(1, 6)])
        pending = await first.read_new(5, 0)  # delivered to a, never acknowledged
        assert len(pending.entries) == 5
        await first.ack([entry_id for entry_id, _ in batch.entries])
        await writer.append([_fields(i) for i in range(6, 306)])  # MAXLEN ~ drops whole nodes: a's pending go
        await asyncio.sleep(0.05)
        reclaimed = await second.reclaim(min_idle_ms=10, count=100)
        assert reclaimed.deleted == 5 and reclaimed.entries == []
        rest = await second.read_new(400, 0)
        assert rest.trimmed + len(rest.entries) == 300 and rest.trimmed > 0
        await second.dead_letter(rest.entries[0][0], rest.entries[0][1], "unreadable")
        await second.ack([entry_id for entry_id, _ in rest.entries])
        own = await second.read_own_pending(10)
        assert own.entries == [] and await second.pending_count() == 0
        await second.heartbeat({"consumer": "b"}, ttl=30)
        reader = AggregateReader(clients.get("control"), KEYS)
        backlog = await reader.backlog("comparators")
        assert backlog == {
            "added": 306,
            "lag": 0,
            "pending": 0,
            "length": backlog["length"],
            "trimmed": rest.trimmed,
            "deleted": 5,
        }
        assert await reader.workers() == [{"consumer": "b"}]
        with _master_client(redis_cluster) as plain:
            assert plain.xlen(KEYS.dead_letter) == 1
    finally:
        await clients.close()


async def test_canary_state_events_lease_feedback_and_pubsub(cluster_url) -> None:
    """Compare-and-set commits (published to a subscriber), events, the lease and feedback joins."""
    clients = Clients(cluster_url, socket_timeout=2)
    store = CanaryStore(clients.get("control"), KEYS)
    other = Clients(cluster_url, socket_timeout=2)
    try:
        initial = CanaryState(stage=0, weight=0.0, stage_started=time.time(), version=0)
        assert await store.create(initial) and not await store.create(initial)
        async with CanaryStore(other.get("control"), KEYS).subscribe() as subscription:
            after = CanaryState(stage=1, weight=0.25, stage_started=time.time(), version=1)
            transition = Transition(initial, after, action="advance", actor="test", reason="gates passed")
            assert await store.commit(transition)
            assert not await store.commit(transition)  # the version moved on
            published = await _next_message(subscription)
        assert published is not None and orjson.loads(published)["weight"] == 0.25
        assert (await store.state()) == after
        assert [e["action"] for e in await store.events()] == ["advance"]
        assert await store.hold_lease("me", 5000) and not await store.hold_lease("you", 5000)
        assert await store.lease_holder() == "me"
        await store.release_lease("me")
        assert await store.hold_lease("you", 5000)
        writer = RecordWriter(clients.get("records"), KEYS, maxlen=100, served_ttl=60)
        await writer.append([_fields(7, b"candidate")])
        assert await store.add_feedback("r7", score=1.0, label="good", window=60, ttl=60) == (
            FEEDBACK_STORED,
            "candidate",
        )
        assert (await store.add_feedback("r7", score=1.0, label=None, window=60, ttl=60))[0] == FEEDBACK_DUPLICATE
        feedback = await AggregateReader(clients.get("control"), KEYS).feedback(60, 60, 60)
        assert feedback["n:candidate"] == 1 and feedback["label:candidate:good"] == 1
    finally:
        await clients.close()
        await other.close()


async def _next_message(subscription: Subscription, within: float = 5.0) -> bytes | None:
    """The next payload (the subscribe confirmation is skipped: it reads as None)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (payload := await subscription.message(deadline - time.monotonic())) is not None:
            return payload
    return None


def _move_slot(cluster: LocalCluster, key: str, target: Node) -> None:
    """Migrate the key's slot, with its keys, to another master (what resharding does)."""
    source = cluster.master_of(key)
    with source.client() as src, target.client() as dst:
        slot = int(src.execute_command("CLUSTER", "KEYSLOT", key))
        source_id = src.execute_command("CLUSTER", "MYID").decode()
        target_id = dst.execute_command("CLUSTER", "MYID").decode()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        for node in cluster.primaries:
            with node.client() as plain:
                plain.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    cluster.wait_ok()


@pytest.mark.slow
async def test_a_slot_moved_to_another_master_is_followed(redis_cluster: LocalCluster, cluster_url) -> None:
    """After the deployment's slot moved (clients still hold the old map), MOVED is followed for scripts,
    pipelines, blocking reads and plain commands: nothing fails and nothing is lost."""
    clients = Clients(cluster_url, socket_timeout=5)
    writer = RecordWriter(clients.get("records"), KEYS, maxlen=1000, served_ttl=60)
    consumer = RecordConsumer(clients.get("comparator"), KEYS, group="comparators", consumer="a", dead_letter_maxlen=10)
    store = CanaryStore(clients.get("control"), KEYS)
    try:
        await consumer.ensure_group()
        await writer.append([_fields(i) for i in range(10)])
        assert len((await consumer.read_new(100, 0)).entries) == 10
        assert await store.hold_lease("me", 60_000)
        before = redis_cluster.master_of(KEYS.records)
        target = next(node for node in redis_cluster.primaries if node is not before)
        await asyncio.to_thread(_move_slot, redis_cluster, KEYS.records, target)
        assert redis_cluster.master_of(KEYS.records) is target
        await writer.append([_fields(i) for i in range(10, 20)])  # pipeline: EVAL, SETs, WAIT
        batch = await consumer.read_new(100, 1000)  # script, then XREAD BLOCK
        assert [int(f[b"seq"]) for _, f in batch.entries] == list(range(11, 21))
        assert await store.hold_lease("me", 60_000) and await store.lease_holder() == "me"
        assert (await AggregateReader(clients.get("control"), KEYS).backlog("comparators"))["added"] == 20
    finally:
        await clients.close()


async def test_no_reachable_seed_is_store_unavailable() -> None:
    """No reachable seed node: the first command raises StoreUnavailable (kind cluster), not redis-py's
    RedisClusterException, which is not a RedisError."""
    url = "redis+cluster://127.0.0.1:1,127.0.0.1:2"
    clients = Clients(url, socket_timeout=1)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await RecordWriter(clients.get("records"), KEYS, maxlen=10).append([_fields(0)])
        assert caught.value.kind == "cluster"
        assert await RecordWriter(clients.get("records"), KEYS, maxlen=10).ping() == (False, "cluster")
    finally:
        await clients.close()

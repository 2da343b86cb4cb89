"""Connections and errors: one client (connection pool) per process and role, and one exception.

Every Redis or socket error raised by a command is turned into ``StoreUnavailable`` with a ``kind``
(``connection``, ``timeout``, ``loading``, ``busy``, ``readonly``, ``oom``, ``cluster``, ``nogroup``,
``response``), so callers catch one type and long-running loops back off and resume on any of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeAlias
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..config import cluster_nodes, is_cluster_url

# One Redis server (or a Sentinel-managed one) or a Redis Cluster: every module of this package takes either.
Client: TypeAlias = aioredis.Redis | RedisCluster


class StoreUnavailable(Exception):
    """Redis could not be reached or refused the command; the caller decides whether to retry."""

    def __init__(self, message: str, *, kind: str = "connection") -> None:
        super().__init__(message)
        self.kind = kind


def kind_of(exc: BaseException) -> str:
    """A short, stable name for what went wrong (a metric label and a log field)."""
    if isinstance(exc, rx.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, rx.BusyLoadingError):
        return "loading"
    if isinstance(exc, rx.ReadOnlyError):
        return "readonly"  # a replica after a failover: the client reconnects to the new master
    if isinstance(exc, rx.OutOfMemoryError):
        return "oom"
    if isinstance(
        exc, rx.ClusterError | rx.MovedError | rx.TryAgainError | rx.ClusterDownError | rx.RedisClusterException
    ):
        return "cluster"  # redirections the client gave up on, CLUSTERDOWN, a slot no node serves
    if isinstance(exc, rx.ConnectionError | OSError):
        return "connection"
    if isinstance(exc, rx.ResponseError):
        text = str(exc)
        if text.startswith("BUSY"):
            return "busy"  # a script or module holds the server: retry later
        if text.startswith("NOGROUP"):
            return "nogroup"  # the stream or group is gone (a restart without persistence)
        if text.startswith("LOADING"):
            return "loading"
        return "response"
    return "error"


class translated:  # noqa: N801 - used as ``with translated():``, like contextlib's helpers
    """Turns any Redis or socket error raised inside the block into ``StoreUnavailable``."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # RedisClusterException (no reachable seed node, a slot not covered) is not a RedisError.
        if exc is not None and isinstance(exc, rx.RedisError | rx.RedisClusterException | OSError | TimeoutError):
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}", kind=kind_of(exc)) from exc


# Errors after which a cluster client's map of slots to nodes may be stale (a master died, a replica took over).
_TOPOLOGY_ERRORS = (rx.ConnectionError, rx.TimeoutError, rx.ClusterDownError, rx.SlotNotCoveredError)


async def forget_topology(client: Any) -> None:
    """Make a cluster client read the topology again (CLUSTER SLOTS) on its next command; no-op otherwise.

    redis-py does this by itself after a single command fails, but not after a pipeline or a pub/sub
    connection fails when its retries are off (as pinned here): without it, a pipeline would keep
    going to a dead master after its replica was promoted. Closing is how redis-py itself refreshes.
    """
    cluster = client.cluster_client if isinstance(client, ClusterPipeline) else client
    if isinstance(cluster, RedisCluster):
        await cluster.aclose()


async def execute(pipe: Any) -> list[Any]:
    """Run a pipeline and always reset it (a pipeline left unreset after a failure warns when collected)."""
    try:
        with translated():
            try:
                replies: list[Any] = await pipe.execute()
            except _TOPOLOGY_ERRORS:
                await forget_topology(pipe)
                raise
            return replies
    finally:
        await pipe.reset()


def queue_script(pipe: Any, script: Any, keys: list[Any], args: list[Any]) -> Any:
    """Queue a registered script's call on a pipeline: returns an awaitable that does no I/O.

    One server: EVALSHA, which redis-py's pipeline loads first when the server lacks it. Cluster:
    EVAL with the body, because redis-py's cluster pipeline never loads scripts, so EVALSHA would
    fail with NOSCRIPT on a node that has not seen it (a replica just promoted, a restarted master).
    Redis caches the compiled body by its SHA either way; the body costs a few KB per batch.
    """
    if isinstance(pipe, ClusterPipeline):
        pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)
        return _done()
    return script(keys=keys, args=args, client=pipe)


async def _done() -> None:
    return None


REPLICA_WAIT_MS = 500  # how long a cluster write waits for its replica's acknowledgement (WAIT)


async def wait_for_replica(pipe: Any, keys: Sequence[str]) -> int:
    """On a cluster, end the pipeline with ``WAIT 1`` on each master (serving one of ``keys``) that has a
    replica; the number of WAITs queued (their replies are the pipeline's last ones).

    Replication is asynchronous: a master killed right after answering may take its last writes
    with it, and the replica promoted in its place never had them. With WAIT the pipeline's answer
    comes once one replica has them too (or after REPLICA_WAIT_MS, when none acknowledged: the
    writes stand, unprotected, and the caller should ``forget_topology`` so that a replica that
    failed is dropped from the client's map). Not queued on one server, nor for a master the map lists
    no replica for (a master just promoted): WAIT would then only add REPLICA_WAIT_MS to every batch.
    Must be queued after the writes it covers.
    """
    if not isinstance(pipe, ClusterPipeline):
        return 0
    with translated():
        cluster = pipe.cluster_client
        await cluster.initialize()  # no I/O unless the slot map was dropped
        masters: dict[str, Any] = {}
        for key in keys:
            nodes = cluster.nodes_manager.slots_cache.get(cluster.keyslot(key), [])
            if len(nodes) >= 2:
                masters.setdefault(nodes[0].name, nodes[0])
    for node in masters.values():
        pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS, target_nodes=node)
    return len(masters)


async def scan(client: Client, match: str, *, slot_of: str) -> list[bytes]:
    """Keys matching a pattern. On a cluster only the master serving ``slot_of``'s slot is scanned: every
    key of a deployment shares its hash tag, so SCAN on the other masters (redis-py's default) finds nothing
    and fails whenever any master is down."""
    with translated():
        if isinstance(client, RedisCluster):
            await client.initialize()
            node = client.get_node_from_key(slot_of)
            return [key async for key in client.scan_iter(match=match, count=100, target_nodes=node)]
        return [key async for key in client.scan_iter(match=match, count=100)]


async def ping(client: Client, *, slot_of: str | Sequence[str]) -> None:
    """PING the server; on a cluster, each master serving one of the ``slot_of`` keys' slots (redis-py's
    default is a random node)."""
    with translated():
        if isinstance(client, RedisCluster):
            await client.initialize()
            keys = [slot_of] if isinstance(slot_of, str) else list(slot_of)
            nodes = {node.name: node for node in (client.get_node_from_key(key) for key in keys) if node is not None}
            for node in nodes.values():
                await client.ping(target_nodes=node)
        else:
            await client.ping()


def connect(url: str, *, socket_timeout: float, max_connections: int | None = None) -> Client:
    """A client with pinned behaviour: RESP2 replies, bytes, explicit timeouts, no hidden retries.

    redis-py 8 defaults to a 5 s socket timeout and retries with backoff inside each call; the
    callers here own their retry policy, so a failure surfaces at once. A broken connection is
    dropped from the pool and the next command opens a new one, so a restarted Redis is picked up
    without any action. ``redis+cluster://`` URLs give a ``RedisCluster`` with the same settings
    (``connect_cluster``).
    """
    if is_cluster_url(url):
        return connect_cluster(url, socket_timeout=socket_timeout, max_connections=max_connections)
    return aioredis.Redis.from_url(url, max_connections=max_connections, **_pinned(socket_timeout))


def _pinned(socket_timeout: float) -> dict[str, Any]:
    """What every client gets, one server or a cluster: RESP2 replies as bytes, explicit timeouts, no retries."""
    return {
        "protocol": 2,
        "decode_responses": False,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(socket_timeout, 2.0),
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def connect_cluster(url: str, *, socket_timeout: float, max_connections: int | None = None) -> RedisCluster:
    """A Redis Cluster client from ``redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]``.

    No retries here either: MOVED, ASK and TRYAGAIN are still followed inside the call (redis-py
    does that whatever the retry count), and a connection error, a timeout or CLUSTERDOWN surfaces
    at once as ``StoreUnavailable`` for the loop to back off; the client re-reads the topology on
    its next command, so a promoted replica is found then.
    """
    userinfo = url.split("://", 1)[1].rpartition("@")[0]
    username, _, password = userinfo.partition(":")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes(url)],
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=url.startswith("rediss+"),
        max_connections=max_connections or 100,
        **_pinned(socket_timeout),
    )


class Clients:
    """The Redis clients of one process, one per role, created on first use and closed together.

    Roles keep traffic of different shapes apart: ``records`` (the recorder's pipelined batches,
    spend sync), ``control`` (canary state, weights, feedback, reports, the admin API) and
    ``comparator`` (a worker's blocking reads and aggregate writes).
    """

    def __init__(self, url: str, *, socket_timeout: float) -> None:
        self.url = url
        self.socket_timeout = socket_timeout
        self._clients: dict[str, Client] = {}

    def get(self, role: str, *, socket_timeout: float | None = None) -> Client:
        client = self._clients.get(role)
        if client is None:
            client = connect(self.url, socket_timeout=socket_timeout or self.socket_timeout)
            self._clients[role] = client
        return client

    @property
    def roles(self) -> list[str]:
        return sorted(self._clients)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


class Backoff:
    """Exponential backoff with full jitter (AWS's "full jitter"): sleep in [0, min(cap, base * 2^n))."""

    def __init__(self, base: float = 0.1, cap: float = 5.0, *, rng: random.Random | None = None) -> None:
        self._base = base
        self._cap = cap
        self._failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self._cap, self._base * (2 ** min(self._failures, 30)))
        self._failures += 1
        return max(self._base / 2, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures

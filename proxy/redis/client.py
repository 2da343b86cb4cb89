"""Connections and errors: one client (connection pool) per process and role, and one exception.

Every Redis or socket error raised by a command is turned into ``StoreUnavailable`` with a ``kind``
(``connection``, ``timeout``, ``loading``, ``busy``, ``readonly``, ``oom``, ``cluster``, ``nogroup``,
``response``), so callers catch one type and long-running loops back off and resume on any of them.
"""

from __future__ import annotations

import random
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


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
    if isinstance(exc, rx.ClusterError | rx.MovedError | rx.TryAgainError | rx.ClusterDownError):
        return "cluster"
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
        if exc is not None and isinstance(exc, rx.RedisError | OSError | TimeoutError):
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}", kind=kind_of(exc)) from exc


async def execute(pipe: Any) -> list[Any]:
    """Run a pipeline and always reset it (a pipeline left unreset after a failure warns when collected)."""
    try:
        with translated():
            replies: list[Any] = await pipe.execute()
            return replies
    finally:
        await pipe.reset()


def connect(url: str, *, socket_timeout: float, max_connections: int | None = None) -> aioredis.Redis:
    """A client with pinned behaviour: RESP2 replies, bytes, explicit timeouts, no hidden retries.

    redis-py 8 defaults to a 5 s socket timeout and retries with backoff inside each call; the
    callers here own their retry policy, so a failure surfaces at once. A broken connection is
    dropped from the pool and the next command opens a new one, so a restarted Redis is picked up
    without any action.
    """
    return aioredis.Redis.from_url(
        url,
        protocol=2,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 2.0),
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        max_connections=max_connections,
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
        self._clients: dict[str, aioredis.Redis] = {}

    def get(self, role: str, *, socket_timeout: float | None = None) -> aioredis.Redis:
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

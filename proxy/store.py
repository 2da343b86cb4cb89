"""The only module that imports redis: key layout, connection settings and reply shapes.

Every key of a deployment shares the hash tag ``{<namespace>}`` so that all of them live in one
Redis Cluster slot (multi-key pipelines and scripts stay legal). Layout: ``docs/redis.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError


class StoreUnavailable(Exception):
    """Redis could not be reached or refused the command; the caller decides whether to retry."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names of one deployment namespace."""

    namespace: str
    records_stream: str = "records"

    @property
    def tag(self) -> str:
        return "{" + self.namespace + "}"

    @property
    def records(self) -> str:
        return f"{self.tag}:{self.records_stream}"

    @property
    def dead_letter(self) -> str:
        return f"{self.tag}:dead-letter"

    @property
    def windows(self) -> str:
        return f"{self.tag}:windows"

    @property
    def segments(self) -> str:
        return f"{self.tag}:segments"

    @property
    def verdict(self) -> str:
        return f"{self.tag}:verdict"

    def aggregate(self, window: int, segment: str) -> str:
        return f"{self.tag}:agg:{window}:{segment}"

    def pairs(self, window: int, segment: str) -> str:
        return f"{self.tag}:pairs:{window}:{segment}"

    def examples(self, window: int, segment: str) -> str:
        return f"{self.tag}:ex:{window}:{segment}"

    def example_data(self, window: int, segment: str) -> str:
        return f"{self.tag}:exdata:{window}:{segment}"

    def seen(self, request_id: str) -> str:
        return f"{self.tag}:seen:{request_id}"

    def worker(self, consumer: str) -> str:
        return f"{self.tag}:worker:{consumer}"

    def served(self, request_id: str) -> str:
        return f"{self.tag}:served:{request_id}"

    def feedback_seen(self, request_id: str) -> str:
        return f"{self.tag}:fbseen:{request_id}"

    def feedback(self, window: int) -> str:
        return f"{self.tag}:fb:{window}"

    def spend(self, candidate: str, minute: int) -> str:
        return f"{self.tag}:spend:{candidate}:{minute}"


def connect(url: str, *, socket_timeout: float) -> aioredis.Redis:
    """A client with pinned behaviour: RESP2 replies, bytes, explicit timeouts, no hidden retries.

    redis-py 8 defaults to a 5 s socket timeout and retries with backoff inside each call; the
    callers here own their retry policy, so a failure surfaces at once.
    """
    return aioredis.Redis.from_url(
        url,
        protocol=2,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 2.0),
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RecordStore:
    """Appends records to the records stream in pipelined batches, trimmed with ``MAXLEN ~``."""

    def __init__(self, url: str, keys: Keys, *, maxlen: int, socket_timeout: float, served_ttl: int = 0) -> None:
        self.keys = keys
        self._maxlen = maxlen
        self._served_ttl = served_ttl
        self._redis = connect(url, socket_timeout=socket_timeout)

    async def append(self, entries: Sequence[dict[str, bytes]]) -> None:
        """XADD every entry in one round trip; raise StoreUnavailable if the batch may not be stored."""
        pipe = self._redis.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(self.keys.records, fields, maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
            if self._served_ttl:
                # Which arm served this request, so user feedback can be joined to it later.
                served = self.keys.served(fields.get("client_request_id", fields["request_id"]).decode())
                # Feedback compares the two arms of the canary: the incumbent and the candidate it promotes.
                arm = b"incumbent" if fields["served_by"] == b"incumbent" else b"candidate"
                pipe.set(served, arm, ex=self._served_ttl)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def sync_spend(
        self, candidate: str, added: dict[int, float], minutes: Sequence[int], ttl: int
    ) -> dict[int, float]:
        """Add this process's spend per minute to the shared counters; the deployment's totals for ``minutes``."""
        pipe = self._redis.pipeline(transaction=False)
        for minute, amount in added.items():
            key = self.keys.spend(candidate, minute)
            pipe.incrbyfloat(key, amount)
            pipe.expire(key, ttl)
        pipe.mget([self.keys.spend(candidate, m) for m in minutes])
        try:
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return {m: float(v) for m, v in zip(minutes, replies[-1], strict=True) if v is not None}

    async def ping(self) -> tuple[bool, str]:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            return False, type(exc).__name__
        return True, "ok"

    async def close(self) -> None:
        await self._redis.aclose()

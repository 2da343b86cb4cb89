"""The canary's Redis state: state (compare-and-set), events, the controller lease, pub/sub, feedback.

Keys (under the deployment's hash tag, see docs/redis.md; with ``record.shards`` > 1 the served,
fbseen and fb keys of a request are under its record's shard tag, so the feedback script touches one slot):
  {ns}:canary:state    JSON CanaryState, changed only through COMMIT (version compare-and-set)
  {ns}:canary:events   stream of transitions (MAXLEN ~)
  {ns}:canary:lease    the controller lease: holder id with a PX expiry
  {ns}:canary          pub/sub channel: the new state after each commit
  {ns}:served:<rid>    which arm served a request (written by the recorder), for feedback joins
  {ns}:fb:<window>     feedback aggregates per arm; {ns}:fbseen:<rid> one feedback per request
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster

from ..canary.state import CanaryState, Transition
from .client import Client, StoreUnavailable, forget_topology, translated
from .keys import Keys

# KEYS: state, events. ARGV: expected version, new state json, event json, events maxlen, channel.
_COMMIT = """
local current = redis.call('GET', KEYS[1])
local version = -1
if current then version = cjson.decode(current)['version'] end
if version ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
"""

# KEYS: lease. ARGV: holder, ttl ms. Take a free lease or extend our own.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: holder. Release only our own lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: served, fbseen, fb window. ARGV: ttl, field prefix values: score or '', label or ''.
_FEEDBACK = """
local arm = redis.call('GET', KEYS[1])
if not arm then return {0, ''} end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return {2, arm} end
redis.call('HINCRBY', KEYS[3], 'n:' .. arm, 1)
if ARGV[2] ~= '' then
  local score = tonumber(ARGV[2])
  redis.call('HINCRBY', KEYS[3], 'scored:' .. arm, 1)
  redis.call('HINCRBYFLOAT', KEYS[3], 'sum:' .. arm, score)
  redis.call('HINCRBYFLOAT', KEYS[3], 'sumsq:' .. arm, score * score)
end
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[3], 'label:' .. arm .. ':' .. ARGV[3], 1) end
redis.call('EXPIRE', KEYS[3], ARGV[1])
return {1, arm}
"""

FEEDBACK_STORED, FEEDBACK_UNKNOWN, FEEDBACK_DUPLICATE = 1, 0, 2


class CanaryStore:
    """State, events and lease of one deployment's canary."""

    def __init__(self, client: Client, keys: Keys, *, events_maxlen: int = 10_000) -> None:
        self.keys = keys
        self._redis = client
        self._events_maxlen = events_maxlen
        self._commit = self._redis.register_script(_COMMIT)
        self._lease = self._redis.register_script(_LEASE)
        self._release = self._redis.register_script(_RELEASE)
        self._feedback = self._redis.register_script(_FEEDBACK)

    @property
    def state_key(self) -> str:
        return self.keys.canary_state

    @property
    def events_key(self) -> str:
        return self.keys.canary_events

    @property
    def lease_key(self) -> str:
        return self.keys.canary_lease

    @property
    def channel(self) -> str:
        return self.keys.canary_channel

    async def _call(self, coro: Any) -> Any:
        with translated():
            return await coro

    async def state(self) -> CanaryState | None:
        raw = await self._call(self._redis.get(self.state_key))
        return None if raw is None else CanaryState.from_dict(orjson.loads(raw))

    async def create(self, state: CanaryState) -> bool:
        """Store the initial state unless one exists (every replica may try; one wins)."""
        return bool(await self._call(self._redis.set(self.state_key, orjson.dumps(state.as_dict()), nx=True)))

    async def commit(self, transition: Transition) -> bool:
        """Write the new state if nobody changed it meanwhile; append the event and announce it."""
        event = {**transition.event(), "time": time.time(), "version": transition.after.version}
        done = await self._call(
            self._commit(
                keys=[self.state_key, self.events_key],
                args=[
                    transition.before.version,
                    orjson.dumps(transition.after.as_dict()),
                    orjson.dumps(event),
                    self._events_maxlen,
                    self.channel,
                ],
            )
        )
        return bool(done)

    async def events(self, count: int = 50) -> list[dict[str, Any]]:
        entries = await self._call(self._redis.xrevrange(self.events_key, count=count))
        return [{"id": entry_id.decode(), **orjson.loads(fields[b"event"])} for entry_id, fields in entries]

    async def hold_lease(self, holder: str, ttl_ms: int) -> bool:
        """Take the controller lease or extend it; False while another live process holds it."""
        return bool(await self._call(self._lease(keys=[self.lease_key], args=[holder, ttl_ms])))

    async def release_lease(self, holder: str) -> None:
        await self._call(self._release(keys=[self.lease_key], args=[holder]))

    async def lease_holder(self) -> str | None:
        raw = await self._call(self._redis.get(self.lease_key))
        return None if raw is None else raw.decode()

    def subscribe(self) -> Subscription:
        """The canary channel: ``async with store.subscribe() as sub: await sub.message(timeout)``."""
        return Subscription(self._redis, self.channel)

    async def add_feedback(
        self, request_id: str, *, score: float | None, label: str | None, window: int, ttl: int
    ) -> tuple[int, str]:
        """Join feedback to the arm that served the request; (FEEDBACK_*, arm)."""
        shard = self.keys.for_record(request_id)  # the recorder wrote the served marker in the record's shard
        keys = [shard.served(request_id), shard.feedback_seen(request_id), shard.feedback(window)]
        code, arm = await self._call(
            self._feedback(keys=keys, args=[ttl, "" if score is None else repr(score), label or ""])
        )
        return int(code), arm.decode() if isinstance(arm, bytes) else str(arm)


class Subscription:
    """A pub/sub subscription whose errors are ``StoreUnavailable`` like every other command's.

    On a cluster, redis-py's ``ClusterPubSub`` subscribes on the node that serves the channel's slot
    (on Redis 6.2 ``PUBLISH`` reaches every node, so any node would do). It reads that node from the
    client's slot map without refreshing it, so the map is loaded before subscribing and dropped after
    a failure: the next subscription then finds the promoted replica instead of the dead master.
    """

    def __init__(self, client: Client, channel: str) -> None:
        self._client = client
        self._pubsub: Any = None
        self._channel = channel

    async def __aenter__(self) -> Subscription:
        async with _refreshing(self._client):
            if isinstance(self._client, RedisCluster):
                await self._client.initialize()  # no I/O unless the slot map was dropped
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(self._channel)
        return self

    async def message(self, wait: float) -> bytes | None:
        """The next published payload, or None when none came within ``wait`` seconds."""
        async with _refreshing(self._client):
            message = await self._pubsub.get_message(timeout=wait)
        if message is not None and message.get("type") == "message":
            return bytes(message["data"])
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()


@contextlib.asynccontextmanager
async def _refreshing(client: Client) -> AsyncIterator[None]:
    """``translated``, and a cluster client's slot map dropped when the failure may mean it is stale."""
    try:
        with translated():
            yield
    except StoreUnavailable as exc:
        if exc.kind in ("connection", "timeout", "cluster"):
            await forget_topology(client)
        raise

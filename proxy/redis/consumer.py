"""The comparator's reads: one consumer group member of a records stream (one shard's), with loss accounting.

New entries are read by a script that also advances the group's delivered ``seq`` and counts the
gap when entries were trimmed before the group read them; entries that vanished while pending
(``XAUTOCLAIM``'s deleted ids, or empty entries on Redis 6.2) are counted too. Lag (entries not yet
delivered) is the records counter minus the group's delivered ``seq``: exact, on Redis 6.2 as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .client import Client, StoreUnavailable, execute, translated
from .keys import Keys

Entry = tuple[bytes, dict[bytes, bytes]]

# KEYS: records stream, delivered hash, lost hash. ARGV: group, consumer, count.
# Returns {entries, trimmed, tail id}; tail id (the stream's last entry) only when nothing was read,
# so the caller can block on XREAD for anything newer.
_READ = """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not reply then
  local tail = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if tail[1] then return {{}, 0, tail[1][1]} end
  return {{}, 0, '0-0'}
end
local entries = reply[1][2]
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local start, trimmed = last, 0
for _, entry in ipairs(entries) do
  local fields = entry[2]
  if fields[1] == 'seq' then
    local seq = tonumber(fields[2])
    if seq > last + 1 then trimmed = trimmed + (seq - last - 1) end
    if seq > last then last = seq end
  end
end
if last ~= start then redis.call('HSET', KEYS[2], ARGV[1], last) end
if trimmed > 0 then redis.call('HINCRBY', KEYS[3], 'trimmed:' .. ARGV[1], trimmed) end
return {entries, trimmed, ''}
"""


@dataclass(slots=True)
class Batch:
    """What one read returned, and what it found missing."""

    entries: list[Entry]
    trimmed: int = 0  # entries trimmed from the stream before this group read them
    deleted: int = 0  # entries gone while pending (trimmed after delivery, before the ack)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


class RecordConsumer:
    """Reads, reclaims, acknowledges and dead-letters entries of the records stream for one consumer."""

    def __init__(self, client: Client, keys: Keys, *, group: str, consumer: str, dead_letter_maxlen: int) -> None:
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self._redis = client
        self._dead_letter_maxlen = dead_letter_maxlen
        self._read = client.register_script(_READ)

    async def ensure_group(self) -> None:
        """Create the consumer group at the start of the stream (and the stream) unless it exists."""
        try:
            with translated():
                await self._redis.xgroup_create(self.keys.records, self.group, id="0", mkstream=True)
        except StoreUnavailable as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, count: int, block_ms: int) -> Batch:
        """Up to ``count`` new entries; waits up to ``block_ms`` for one when there are none."""
        batch, tail = await self._read_once(count)
        if batch.entries or not block_ms:
            return batch
        with translated():
            # Wakes as soon as anything newer than the tail is added (at once if it already was).
            await self._redis.xread({self.keys.records: tail}, count=1, block=block_ms)
        batch, _ = await self._read_once(count)
        return batch

    async def _read_once(self, count: int) -> tuple[Batch, bytes]:
        keys = [self.keys.records, self.keys.delivered, self.keys.lost]
        try:
            with translated():
                reply: Any = await self._read(keys=keys, args=[self.group, self.consumer, count])
        except StoreUnavailable as exc:
            if exc.kind != "nogroup":
                raise
            # The stream or group is gone (Redis restarted without persistence): start again.
            await self.ensure_group()
            with translated():
                reply = await self._read(keys=keys, args=[self.group, self.consumer, count])
        raw, trimmed, tail = reply
        entries = [(entry[0], _pairs(entry[1])) for entry in raw]
        return Batch(entries, trimmed=int(trimmed)), tail or b"0-0"

    async def read_own_pending(self, count: int) -> Batch:
        """Entries delivered to this consumer earlier and never acknowledged (after a restart)."""
        with translated():
            reply: Any = await self._redis.xreadgroup(self.group, self.consumer, {self.keys.records: "0"}, count=count)
        found = [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]
        deleted = await self._sweep_deleted() if any(not fields for _, fields in found) else 0
        return Batch([(i, f) for i, f in found if i and f], deleted=deleted)

    async def reclaim(self, min_idle_ms: int, count: int) -> Batch:
        """Take over entries idle longer than min_idle_ms on other (dead) consumers."""
        with translated():
            reply = await self._redis.xautoclaim(
                self.keys.records, self.group, self.consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
            )
        # [next_start, [(id, fields), ...], deleted_ids] on Redis >= 7 (which drops deleted ids from the
        # pending list itself); on 6.2 a deleted entry comes back as (None, None) and stays pending.
        claimed = reply[1] if len(reply) > 1 else []
        deleted = len(reply[2]) if len(reply) > 2 else 0
        if deleted:
            await self._count_deleted(deleted)
        if any(not entry_id or not fields for entry_id, fields in claimed):
            deleted += await self._sweep_deleted()
        return Batch([(i, f) for i, f in claimed if i and f], deleted=deleted)

    async def _sweep_deleted(self, limit: int = 1000) -> int:
        """Acknowledge and count this consumer's pending entries that no longer exist in the stream."""
        records = self.keys.records
        with translated():
            pending = await self._redis.xpending_range(records, self.group, "-", "+", limit, consumername=self.consumer)
            ids = [item["message_id"] for item in pending]
            pipe = self._redis.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xrange(records, entry_id, entry_id, count=1)
            exists = await execute(pipe) if ids else []
        gone = [entry_id for entry_id, found in zip(ids, exists, strict=True) if not found]
        if gone:
            with translated():
                await self._redis.xack(records, self.group, *gone)
            await self._count_deleted(len(gone))
        return len(gone)

    async def _count_deleted(self, count: int) -> None:
        with translated():
            await self._redis.hincrby(self.keys.lost, f"deleted:{self.group}", count)

    async def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        """Keep an unreadable record aside with the reason, so it never blocks the group."""
        with translated():
            await self._redis.xadd(
                self.keys.dead_letter,
                {**fields, b"dead_letter.reason": reason.encode()[:500], b"dead_letter.entry_id": entry_id},  # type: ignore[dict-item]
                maxlen=self._dead_letter_maxlen,
                approximate=True,
            )

    async def ack(self, entry_ids: Sequence[bytes]) -> None:
        if entry_ids:
            with translated():
                await self._redis.xack(self.keys.records, self.group, *entry_ids)

    async def heartbeat(self, status: dict[str, Any], ttl: int) -> None:
        with translated():
            await self._redis.set(self.keys.worker(self.consumer), orjson.dumps(status), ex=ttl)

    async def pending_count(self) -> int:
        with translated():
            info = await self._redis.xpending(self.keys.records, self.group)
        return int(info["pending"]) if info else 0


async def backlog(client: Client, keys: Keys, group: str) -> dict[str, int | None]:
    """The group's lag (entries added, not yet delivered), pending (delivered, not acked) and losses,
    summed over every shard's stream (each shard has its own group of that name)."""
    shards = keys.all_shards()
    pipe = client.pipeline(transaction=False)
    for shard in shards:
        pipe.get(shard.records_seq)
        pipe.hget(shard.delivered, group)
        pipe.hgetall(shard.lost)
        pipe.xlen(shard.records)
    with translated():
        replies = await execute(pipe)
    total: dict[str, int] = {"added": 0, "lag": 0, "length": 0, "trimmed": 0, "deleted": 0}
    for index in range(len(shards)):
        added, delivered, lost, length = replies[index * 4 : index * 4 + 4]
        losses = {k.decode(): int(v) for k, v in (lost or {}).items()}
        total["added"] += int(added or 0)
        total["lag"] += max(0, int(added or 0) - int(delivered or 0))
        total["length"] += int(length)
        total["trimmed"] += losses.get(f"trimmed:{group}", 0)
        total["deleted"] += losses.get(f"deleted:{group}", 0)
    pending: int | None = None  # None when no shard has the group yet
    for shard in shards:
        try:
            with translated():
                info = await client.xpending(shard.records, group)
        except StoreUnavailable as exc:
            if exc.kind != "nogroup":
                raise
            continue
        pending = (pending or 0) + (int(info["pending"]) if info else 0)
    return {
        "added": total["added"],
        "lag": total["lag"],
        "pending": pending,
        "length": total["length"],
        "trimmed": total["trimmed"],
        "deleted": total["deleted"],
    }

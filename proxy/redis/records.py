"""The proxy's writes: records appended to the stream (each numbered), who served what, shared spend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .client import Client, execute, forget_topology, ping, queue_script, translated, wait_for_replica
from .keys import Keys

# KEYS: records stream, seq counter. ARGV: maxlen, then per record its field-pair count n and 2n values.
# Each entry gets ``seq`` (first field), the counter's next value: seqs are dense and in stream order, so
# a consumer group can tell exactly how many entries were trimmed before it read them (docs/redis.md).
_APPEND = """
local maxlen = ARGV[1]
local i, added = 2, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local seq = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'seq', seq, unpack(ARGV, i + 1, i + 2 * n))
  i = i + 1 + 2 * n
  added = added + 1
end
return added
"""


class RecordWriter:
    """Appends records in one round trip per batch, trimmed with ``MAXLEN ~``."""

    def __init__(self, client: Client, keys: Keys, *, maxlen: int, served_ttl: int = 0) -> None:
        self.keys = keys
        self._redis = client
        self._maxlen = maxlen
        self._served_ttl = served_ttl
        self._append = client.register_script(_APPEND)

    async def append(self, entries: Sequence[Mapping[bytes, bytes]]) -> None:
        """Add every entry (atomically numbered per shard); raise StoreUnavailable if the batch may not be stored.

        The batch is one pipeline: one append script per shard it has records of (a script touches the
        keys of one shard, so of one cluster slot), then the served markers (each in its record's shard).
        On a cluster redis-py splits the pipeline by node. A batch that fails may have been stored in part
        or whole: retrying it is safe because the comparator counts each request id once.
        """
        if not entries:
            return
        by_shard: dict[int, list[bytes | int]] = {}
        for fields in entries:
            shard = self.keys.shard_of(fields[b"request_id"].decode()) if self.keys.shards > 1 else 0
            args = by_shard.setdefault(shard, [self._maxlen])
            args.append(len(fields))
            for key, value in fields.items():
                args += (key, value)
        pipe = self._redis.pipeline(transaction=False)
        written = []
        for shard, args in sorted(by_shard.items()):
            keys = self.keys.shard(shard)
            written.append(keys.records)
            await queue_script(pipe, self._append, [keys.records, keys.records_seq], args)
        if self._served_ttl:
            for fields in entries:
                # Which arm served this request, so user feedback (its token names our record id) can be
                # joined to it later.
                record_id = fields[b"request_id"].decode()
                served = self.keys.for_record(record_id).served(record_id)
                # Feedback compares the two arms of the canary: the incumbent and the candidate it promotes.
                arm = b"incumbent" if fields[b"served_by"] == b"incumbent" else b"candidate"
                pipe.set(served, arm, ex=self._served_ttl)
        waits = await wait_for_replica(pipe, written)
        with translated():
            replies = await execute(pipe)
        if waits and not all(replies[-waits:]):
            await forget_topology(self._redis)  # a replica did not acknowledge: read which ones are alive

    async def sync_spend(
        self, candidate: str, added: dict[int, float], minutes: Sequence[int], ttl: int
    ) -> dict[int, float]:
        """Add this process's spend per minute to the shared counters; the deployment's totals for ``minutes``."""
        pipe = self._redis.pipeline(transaction=False)
        for minute, amount in added.items():
            key = self.keys.spend(candidate, minute)
            pipe.incrbyfloat(key, amount)
            pipe.expire(key, ttl)
        # MGET by name: redis-py's cluster pipeline refuses pipe.mget (these keys share one slot, so it is legal).
        pipe.execute_command("MGET", *(self.keys.spend(candidate, m) for m in minutes))
        with translated():
            replies = await execute(pipe)
        return {m: float(v) for m, v in zip(minutes, replies[-1], strict=True) if v is not None}

    async def ping(self) -> tuple[bool, str]:
        try:
            await ping(self._redis, slot_of=[keys.records for keys in self.keys.all_shards()])
        except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
            return False, getattr(exc, "kind", type(exc).__name__)
        return True, "ok"


async def read_records(
    client: Client, keys: Keys, *, last: int | None, since: float | None
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Recorded entries, oldest first: the last N (default 100), or everything since a Unix time.

    With several shards each stream is read and the entries merged in time order (entry ids start
    with the millisecond they were added).
    """
    found: list[tuple[bytes, dict[bytes, bytes]]] = []
    for shard in keys.all_shards():
        entries: Any
        with translated():
            if since is not None:
                entries = await client.xrange(shard.records, min=f"{int(since * 1000)}-0", max="+")
            else:
                entries = await client.xrevrange(shard.records, count=last or 100)
        found += list(entries or [])
    found.sort(key=lambda entry: _id_order(entry[0]))
    if since is None:
        found = found[-(last or 100) :]
    return found


def _id_order(entry_id: bytes) -> tuple[int, int]:
    millis, _, seq = entry_id.partition(b"-")
    return int(millis), int(seq or 0)

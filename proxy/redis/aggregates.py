"""The comparator's aggregates: idempotent updates per (window, segment), and the reads reports need.

Idempotency: one Lua script per (window, segment) group of a batch marks each request id as seen
(``SET NX EX``) and adds only the unseen records' counters, atomically. A record delivered twice
(a worker died before ``XACK``, or the recorder retried a batch) therefore counts once.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from ..comparator.report_model import Report
from .client import Client, execute, queue_script, scan, translated
from .consumer import backlog
from .keys import Keys

if TYPE_CHECKING:
    from ..comparator.aggregate import Contribution

# KEYS: agg, pairs, examples zset, example data hash, windows zset, segments hash, then one seen key per record.
# ARGV: ttl, seen_ttl, reservoir_max, examples_max, window, window member, segment id, segment json, and one
#       JSON payload: {"totals": {counter: sum over the records}, "records": [[request id, counters json,
#       pair json or "", uniform draw in [0, 1), example score or "", example json or ""], ...]}.
# The totals are added when every record is new (the usual case); a record seen before is subtracted
# from them, so only duplicates pay for decoding their own counters.
_APPLY = """
local agg, reservoir, exz, exh, windows, segments = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ttl, seen_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local rmax, emax = tonumber(ARGV[3]), tonumber(ARGV[4])
local payload = cjson.decode(ARGV[9])
local totals = payload['totals']
local applied = 0
for i, record in ipairs(payload['records']) do
  if redis.call('SET', KEYS[6 + i], '1', 'NX', 'EX', seen_ttl) then
    applied = applied + 1
    if record[3] ~= '' then
      -- Reservoir sampling (algorithm R): every pair of the window has the same chance to be kept. While
      -- filling, each new pair swaps places with a random one (inside-out Fisher-Yates), so the list is
      -- in random order and any prefix of it is a uniform sample too (not the earliest arrivals).
      local seen = redis.call('HINCRBY', agg, 'reservoir_seen', 1)
      if seen <= rmax then
        local slot = math.floor(record[4] * seen)
        if slot < seen - 1 then
          redis.call('RPUSH', reservoir, redis.call('LINDEX', reservoir, slot))
          redis.call('LSET', reservoir, slot, record[3])
        else
          redis.call('RPUSH', reservoir, record[3])
        end
      else
        local slot = math.floor(record[4] * seen)
        if slot < rmax then redis.call('LSET', reservoir, slot, record[3]) end
      end
    end
    if record[5] ~= '' then
      redis.call('ZADD', exz, record[5], record[1])
      redis.call('HSET', exh, record[1], record[6])
    end
  else
    for k, v in pairs(cjson.decode(record[2])) do totals[k] = totals[k] - v end
  end
end
if applied > 0 then
  for k, v in pairs(totals) do
    if v ~= 0 then redis.call('HINCRBYFLOAT', agg, k, string.format('%.17g', v)) end
  end
  local extra = redis.call('ZCARD', exz) - emax
  if extra > 0 then
    local popped = redis.call('ZPOPMIN', exz, extra)
    for j = 1, #popped, 2 do redis.call('HDEL', exh, popped[j]) end
  end
  for _, key in ipairs({agg, reservoir, exz, exh}) do redis.call('EXPIRE', key, ttl) end
  redis.call('ZADD', windows, ARGV[5], ARGV[6])
  redis.call('HSET', segments, ARGV[7], ARGV[8])
end
return applied
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of what the comparator keeps in Redis."""

    window_ttl: int
    seen_ttl: int
    reservoir: int
    examples: int


class AggregateWriter:
    """Adds a batch's contributions to the per-(window, segment) aggregates, idempotently."""

    def __init__(self, client: Client, keys: Keys, *, limits: Limits) -> None:
        self.keys = keys
        self._redis = client
        self._limits = limits
        self._apply = client.register_script(_APPLY)
        self._random = random.Random()

    async def apply(self, contributions: Sequence[Contribution], *, shard: int = 0) -> int:
        """Add contributions grouped by (window, segment); returns how many were new (not seen before).

        Every key written is shard ``shard``'s (the shard of the stream the records were read from), seen
        markers included: each script touches one slot, and a record always counts in its own shard.
        """
        shard_keys = self.keys.shard(shard)
        groups: dict[tuple[int, str], list[Contribution]] = defaultdict(list)
        for item in contributions:
            groups[(item.window, item.segment.id)].append(item)
        pipe = self._redis.pipeline(transaction=False)
        limits = self._limits
        for (window, segment_id), items in groups.items():
            keys = [
                shard_keys.aggregate(window, segment_id),
                shard_keys.pairs(window, segment_id),
                shard_keys.examples(window, segment_id),
                shard_keys.example_data(window, segment_id),
                shard_keys.windows,
                shard_keys.segments,
                *(shard_keys.seen(i.dedup_id) for i in items),
            ]
            totals: dict[str, float] = {}
            records = []
            for item in items:
                for key, value in item.counters.items():
                    totals[key] = totals.get(key, 0.0) + value
                records.append(
                    [
                        item.request_id,
                        orjson.dumps(item.counters).decode(),
                        orjson.dumps(item.pair).decode() if item.pair is not None else "",
                        self._random.random(),
                        item.example_score if item.example_score is not None else "",
                        item.example.decode() if item.example else "",
                    ]
                )
            args: list[Any] = [
                limits.window_ttl,
                limits.seen_ttl,
                limits.reservoir,
                limits.examples,
                window,
                f"{window}:{segment_id}",
                segment_id,
                items[0].segment.json(),
                orjson.dumps({"totals": totals, "records": records}),
            ]
            await queue_script(pipe, self._apply, keys, args)
        with translated():
            results = await execute(pipe)
        return sum(int(r) for r in results)

    async def forget_expired_windows(self) -> None:
        cutoff = time.time() - self._limits.window_ttl
        with translated():
            for shard in self.keys.all_shards():
                await self._redis.zremrangebyscore(shard.windows, "-inf", cutoff)


PAIRS_BUDGET = 50_000  # paired samples one report loads at most (descriptive figures only: gates use counters)
EXAMPLE_WINDOWS = 500  # (window, segment)s whose examples one report reads


@dataclass(frozen=True, slots=True)
class WindowData:
    """What one (window, segment) holds."""

    window: int
    segment: str
    counters: dict[str, float]
    pairs: list[list[float]]
    examples: list[dict[str, Any]]


class AggregateReader:
    """Reads aggregates over a time range for reports and verdicts, and stores the latest verdict."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.keys = keys
        self._redis = client

    async def segments(self) -> dict[str, dict[str, Any]]:
        """Every segment seen, over all shards."""
        found: dict[str, dict[str, Any]] = {}
        for shard in self.keys.all_shards():
            with translated():
                raw: dict[bytes, bytes] = await self._redis.hgetall(shard.segments)  # type: ignore[assignment]
            found.update((k.decode(), orjson.loads(v)) for k, v in raw.items())
        return found

    async def load(self, since: float, until: float, examples: int) -> list[WindowData]:
        """Every (window, segment) whose window starts in [since, until], merged over the shards.

        Bounded whatever the range: about PAIRS_BUDGET paired samples in all (each window's share in
        proportion to its pairs; a reservoir is in random order, so its prefix is a uniform sample) and
        examples from the EXAMPLE_WINDOWS most recent windows; counters are always complete. With several
        shards each (window, segment) has one set of keys per shard: counters are added (every counter is
        a sum, sketches included), samples taken from each shard in proportion to its pairs, examples joined.
        """
        with translated():
            return await self._load(since, until, examples)

    async def _load(self, since: float, until: float, examples: int) -> list[WindowData]:
        shards = self.keys.all_shards()
        pipe = self._redis.pipeline(transaction=False)
        for shard in shards:
            pipe.zrangebyscore(shard.windows, since, until)
        member_lists: list[list[bytes]] = await execute(pipe)
        parsed: list[tuple[Keys, int, str]] = []
        pipe = self._redis.pipeline(transaction=False)
        for shard, members in zip(shards, member_lists, strict=True):
            for member in members:
                window_text, _, segment = member.decode().partition(":")
                parsed.append((shard, int(window_text), segment))
                pipe.hgetall(shard.aggregate(int(window_text), segment))
        # One part per (shard, window, segment) still there; merged per (window, segment) below.
        parts: list[tuple[Keys, WindowData]] = []
        for (shard, window, segment), counters_raw in zip(parsed, await execute(pipe) if parsed else [], strict=True):
            if counters_raw:  # else expired between the index and the read
                counters = {k.decode(): float(v) for k, v in counters_raw.items()}
                parts.append((shard, WindowData(window, segment, counters, [], [])))
        merged: dict[tuple[int, str], WindowData] = {}
        for _, part in parts:
            into = merged.get((part.window, part.segment))
            if into is None:
                merged[(part.window, part.segment)] = WindowData(part.window, part.segment, dict(part.counters), [], [])
            else:
                for key, value in part.counters.items():
                    into.counters[key] = into.counters.get(key, 0.0) + value
        found = [merged[key] for key in sorted(merged)]
        recent = {(data.window, data.segment) for data in found[-EXAMPLE_WINDOWS:]}
        # Samples in proportion to each part's traffic, so pooled samples weigh pairs, not windows or shards.
        traffic = sum(data.counters.get("n", 0.0) for _, data in parts) or 1.0
        pipe = self._redis.pipeline(transaction=False)
        for shard, data in parts:
            share = max(1, round(PAIRS_BUDGET * data.counters.get("n", 0.0) / traffic))
            pipe.lrange(shard.pairs(data.window, data.segment), 0, share - 1)
            wanted = examples if (data.window, data.segment) in recent else 0
            # ZREVRANGE 0 -1 would mean "all": ask for the empty range 1..0 when none are wanted.
            pipe.zrevrange(shard.examples(data.window, data.segment), 0 if wanted else 1, wanted - 1 if wanted else 0)
        replies = await execute(pipe) if parts else []
        example_pipe = self._redis.pipeline(transaction=False)
        for index, (shard, data) in enumerate(parts):
            pairs_raw, example_ids = replies[index * 2 : index * 2 + 2]
            merged[(data.window, data.segment)].pairs.extend(orjson.loads(p) for p in pairs_raw)
            example_pipe.hmget(shard.example_data(data.window, data.segment), example_ids or ["-"])
        example_replies = await execute(example_pipe) if parts else []
        for (_, data), payloads in zip(parts, example_replies, strict=True):
            merged[(data.window, data.segment)].examples.extend(orjson.loads(p) for p in payloads if p)
        return found

    async def save_verdict(self, report: dict[str, Any], ttl: int) -> None:
        with translated():
            await self._redis.set(self.keys.verdict, orjson.dumps(report), ex=ttl)

    async def workers(self) -> list[dict[str, Any]]:
        keys = await scan(self._redis, self.keys.worker("*"), slot_of=self.keys.verdict)  # the deployment's tag
        with translated():
            values = await self._redis.mget(keys) if keys else []
        return [orjson.loads(v) for v in values if v]

    async def feedback(self, since: float, until: float, step: int) -> dict[str, float]:
        """User feedback counters (per arm) merged over the windows of [since, until] and the shards."""
        first = int(since // step) * step
        pipe = self._redis.pipeline(transaction=False)
        for shard in self.keys.all_shards():
            for window in range(first, int(until // step) * step + step, step):
                pipe.hgetall(shard.feedback(window))
        total: dict[str, float] = {}
        with translated():
            replies = await execute(pipe)
        for reply in replies:
            for key, value in reply.items():
                total[key.decode()] = total.get(key.decode(), 0.0) + float(value)
        return total

    async def stream_length(self) -> int:
        """Entries in the records streams (every shard's)."""
        with translated():
            return sum([int(await self._redis.xlen(shard.records)) for shard in self.keys.all_shards()])

    async def latest_verdict(self) -> Report | None:
        """The last stored report; None when there is none, or it was written by an older version."""
        with translated():
            raw = await self._redis.get(self.keys.verdict)
        if raw is None:
            return None
        try:
            return Report.model_validate_json(raw)
        except ValidationError:
            return None

    async def backlog(self, group: str) -> dict[str, int | None]:
        """Lag, pending, stream length and counted losses of a consumer group (``consumer.backlog``)."""
        return await backlog(self._redis, self.keys, group)

    async def pending(self, group: str) -> int | None:
        """Entries delivered to the group and not acknowledged; None when the group does not exist."""
        return (await self.backlog(group))["pending"]

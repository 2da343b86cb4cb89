"""The key layout of one deployment (``docs/redis.md``).

With one shard (``record.shards = 1``, the default) every key shares the hash tag ``{<namespace>}``, so
a deployment lives in one Redis Cluster slot. With N shards the per-record keys (the records stream and
its accounting, dead letters, the aggregates built from its records, served and feedback keys) go to N tags
``{<namespace>:s<k>}``, one per shard, so they spread over N slots; the rest (canary, leases, spend,
worker health, verdict) stays on ``{<namespace>}``. Every script touches the keys of one shard (one
slot), so it stays legal on a cluster; a pipeline may span shards (a cluster pipeline is split by node).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace


def shard_of(record_id: str, shards: int) -> int:
    """The shard of a record, from the proxy's own record id (stable across processes and restarts)."""
    if shards <= 1:
        return 0
    return zlib.crc32(record_id.encode()) % shards


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names of one deployment namespace; ``shard(k)`` names the keys of shard k."""

    namespace: str
    records_stream: str = "records"
    shards: int = 1
    index: int = 0  # which shard these keys name (0 with one shard)

    @property
    def tag(self) -> str:
        """The hash tag of this shard's keys: the deployment's own with one shard."""
        if self.shards <= 1:
            return self.base_tag
        return "{" + f"{self.namespace}:s{self.index}" + "}"

    @property
    def base_tag(self) -> str:
        """The deployment's hash tag: keys that are not per record (canary, spend, workers, verdict)."""
        return "{" + self.namespace + "}"

    def shard(self, index: int) -> Keys:
        """The keys of shard ``index`` (0 <= index < shards)."""
        if not 0 <= index < max(1, self.shards):
            raise ValueError(f"shard {index} out of range for {self.shards} shards")
        return self if index == self.index else replace(self, index=index)

    def all_shards(self) -> list[Keys]:
        """The keys of every shard, in shard order (one entry with one shard)."""
        return [self.shard(k) for k in range(max(1, self.shards))]

    def shard_of(self, record_id: str) -> int:
        return shard_of(record_id, self.shards)

    def for_record(self, record_id: str) -> Keys:
        """The keys of the shard holding ``record_id`` (the proxy's record id, ``request_id`` in a record)."""
        return self.shard(self.shard_of(record_id))

    # Records and their accounting.
    @property
    def records(self) -> str:
        return f"{self.tag}:{self.records_stream}"

    @property
    def records_seq(self) -> str:
        """Counter of records ever added: each entry carries its value as ``seq`` (dense, in stream order)."""
        return f"{self.tag}:{self.records_stream}:seq"

    @property
    def delivered(self) -> str:
        """Hash: consumer group -> the highest ``seq`` delivered to it."""
        return f"{self.tag}:{self.records_stream}:delivered"

    @property
    def lost(self) -> str:
        """Hash: ``trimmed:<group>`` (trimmed before delivery) and ``deleted:<group>`` (trimmed while pending)."""
        return f"{self.tag}:{self.records_stream}:lost"

    @property
    def dead_letter(self) -> str:
        return f"{self.tag}:dead-letter"

    # Aggregates.
    @property
    def windows(self) -> str:
        return f"{self.tag}:windows"

    @property
    def segments(self) -> str:
        return f"{self.tag}:segments"

    @property
    def verdict(self) -> str:
        return f"{self.base_tag}:verdict"

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
        return f"{self.base_tag}:worker:{consumer}"

    # Feedback and spend.
    def served(self, request_id: str) -> str:
        return f"{self.tag}:served:{request_id}"

    def feedback_seen(self, request_id: str) -> str:
        return f"{self.tag}:fbseen:{request_id}"

    def feedback(self, window: int) -> str:
        return f"{self.tag}:fb:{window}"

    def spend(self, candidate: str, minute: int) -> str:
        return f"{self.base_tag}:spend:{candidate}:{minute}"

    # The canary.
    @property
    def canary_state(self) -> str:
        return f"{self.base_tag}:canary:state"

    @property
    def canary_events(self) -> str:
        return f"{self.base_tag}:canary:events"

    @property
    def canary_lease(self) -> str:
        return f"{self.base_tag}:canary:lease"

    @property
    def canary_channel(self) -> str:
        return f"{self.base_tag}:canary"

"""The key layout of one deployment (``docs/redis.md``).

Every key shares the hash tag ``{<namespace>}``, so a deployment lives in one Redis Cluster slot and
multi-key pipelines and scripts stay legal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names of one deployment namespace."""

    namespace: str
    records_stream: str = "records"

    @property
    def tag(self) -> str:
        return "{" + self.namespace + "}"

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

    # Feedback and spend.
    def served(self, request_id: str) -> str:
        return f"{self.tag}:served:{request_id}"

    def feedback_seen(self, request_id: str) -> str:
        return f"{self.tag}:fbseen:{request_id}"

    def feedback(self, window: int) -> str:
        return f"{self.tag}:fb:{window}"

    def spend(self, candidate: str, minute: int) -> str:
        return f"{self.tag}:spend:{candidate}:{minute}"

    # The canary.
    @property
    def canary_state(self) -> str:
        return f"{self.tag}:canary:state"

    @property
    def canary_events(self) -> str:
        return f"{self.tag}:canary:events"

    @property
    def canary_lease(self) -> str:
        return f"{self.tag}:canary:lease"

    @property
    def canary_channel(self) -> str:
        return f"{self.tag}:canary"

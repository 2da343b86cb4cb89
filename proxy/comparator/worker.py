"""The comparator worker loop: short and restartable.

Each turn: reclaim entries idle on dead consumers, read new ones, parse and measure them, write the
aggregates (idempotently), then ``XACK``. A record that cannot be processed (unreadable, too deep,
any exception while measuring it) goes to the dead-letter stream with its reason and is
acknowledged, so it never blocks the group or kills a worker. Redis trouble (a restart, a failover,
a timeout, BUSY or LOADING) is waited out with backoff; the worker's health key says since when.
``burst`` processes what is there and returns, for tests and backfills.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, field

import structlog

from ..config import Config, UpstreamConfig
from ..redis import AggregateWriter, Backoff, Batch, Clients, Entry, Keys, Limits, RecordConsumer, StoreUnavailable
from ..supervisor import Health
from .aggregate import Contribution, Judged, Semantic, Settings, contributions
from .judge import Judge
from .measures import Tolerance
from .parse import PoisonRecord, Record, parse_record
from .pricing import PriceBook
from .semantic import SemanticScorer

log = structlog.get_logger("shadow_proxy.comparator")


@dataclass(slots=True)
class Progress:
    """What this worker has done since it started."""

    read: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    trimmed: int = 0  # records trimmed from the stream before this worker's group read them (found by it)
    deleted: int = 0  # records gone from the stream while pending
    redis_errors: int = 0
    parse_errors: dict[str, int] = field(default_factory=dict)  # reason -> answers with that unreadable part
    semantic_fallbacks: dict[str, int] = field(default_factory=dict)  # reason -> batches scored lexically only
    judged: int = 0  # pairs the judge gave a verdict on
    judge_skipped: dict[str, int] = field(default_factory=dict)  # reason -> sampled pairs left unjudged
    started: float = field(default_factory=time.time)


def settings_from(config: Config) -> Settings:
    compare = config.compare
    arms: list[tuple[str, UpstreamConfig]] = [("incumbent", config.incumbent)]
    arms += [(c.name, c) for c in config.candidate]
    return Settings(
        window_seconds=compare.window_seconds,
        tolerance=Tolerance(frozenset(compare.ignore_paths), compare.abs_tolerance, compare.rel_tolerance),
        prices={name: price_book(arm) for name, arm in arms},
        censor_ms={name: (arm.total_timeout or arm.read_timeout) * 1000.0 for name, arm in arms},
    )


def price_book(arm: UpstreamConfig) -> PriceBook:
    """The arm's price table when one is configured, else the maintained price list."""
    price = arm.price
    return PriceBook((price.input_per_1k, price.output_per_1k) if price.input_per_1k or price.output_per_1k else None)


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One member of the comparator consumer group."""

    def __init__(self, config: Config, redis_url: str) -> None:
        compare = config.compare
        self._config = compare
        self._settings = settings_from(config)
        # Redis answers a blocking read after block_ms; the socket must wait longer than that.
        socket_timeout = max(config.record.socket_timeout, compare.block_ms / 1000.0 + 2.0)
        self._clients = Clients(redis_url, socket_timeout=socket_timeout)
        client = self._clients.get("comparator")
        keys = Keys(config.record.namespace, config.record.stream, config.record.shards)
        consumer = compare.consumer or default_consumer()
        # One consumer per shard's stream (each has its consumer group): a worker reads every shard, and
        # every worker does, so several share each shard's group as they would share one stream.
        self.shards = [
            RecordConsumer(
                client, shard, group=compare.group, consumer=consumer, dead_letter_maxlen=compare.dead_letter_maxlen
            )
            for shard in keys.all_shards()
        ]
        self._waits = 0  # turns that waited for new records (which shard's stream to wait on next)
        self.aggregates = AggregateWriter(
            client,
            keys,
            limits=Limits(
                compare.window_ttl, compare.dedup_ttl, compare.reservoir_per_window, compare.examples_per_window
            ),
        )
        self.health = Health("comparator")
        self.progress = Progress()
        self._stopping = asyncio.Event()
        self._semantic = SemanticScorer(compare.semantic) if compare.semantic.url else None
        self._judge = Judge(compare.judge) if compare.judge.url else None

    def stop(self) -> None:
        self._stopping.set()

    @property
    def records(self) -> RecordConsumer:
        """The first shard's consumer (the only one with ``record.shards = 1``)."""
        return self.shards[0]

    @property
    def consumer(self) -> str:
        return self.records.consumer

    async def _pending(self) -> int:
        return sum([await shard.pending_count() for shard in self.shards])

    async def close(self) -> None:
        await self._clients.close()

    async def run(self, *, burst: bool = False) -> Progress:
        """Process until stopped (or, in burst mode, until nothing is left).

        An exception that escapes a turn (a bug, not a bad record: those are dead-lettered) is logged,
        counted in the health key and the loop goes on after a backoff; in burst mode it is raised.
        """
        try:
            backoff = Backoff(0.2, 5.0)
            while True:
                try:
                    return await self._run(burst=burst)
                except Exception as exc:
                    if burst:
                        raise
                    self.health.restarts += 1
                    self.health.down(f"crashed: {type(exc).__name__}")
                    log.error("comparator_crashed", error=f"{type(exc).__name__}: {exc}"[:500], **self._summary())
                    await asyncio.sleep(backoff.next())
        finally:
            if self._semantic is not None:
                await self._semantic.close()
            if self._judge is not None:
                await self._judge.close()

    async def _run(self, *, burst: bool) -> Progress:
        backoff = Backoff(0.1, 5.0)
        started = False
        last_beat = 0.0
        while not self._stopping.is_set():
            try:
                if not started:
                    for shard in self.shards:
                        await shard.ensure_group()
                    log.info(
                        "comparator_started",
                        consumer=self.consumer,
                        group=self.records.group,
                        shards=len(self.shards),
                        burst=burst,
                    )
                    for shard in self.shards:
                        await self._process(shard, await shard.read_own_pending(self._config.batch_size))
                    started = True
                handled = await self._turn(block=not burst)
                if not self.health.ok:
                    log.warning("comparator_redis_resumed", consumer=self.consumer)
                self.health.up()
                backoff.reset()
                if time.monotonic() - last_beat > self._config.health_ttl / 3:
                    await self._heartbeat()
                    last_beat = time.monotonic()
                if burst and handled == 0 and await self._pending() == 0:
                    break
            except StoreUnavailable as exc:
                self.progress.redis_errors += 1
                if self.health.ok:
                    log.warning("comparator_redis_unavailable", error=str(exc), kind=exc.kind)
                self.health.down(f"redis {exc.kind}")
                last_beat = 0.0  # say so in the health key as soon as Redis answers again
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next())
        with contextlib.suppress(StoreUnavailable):
            await self._heartbeat()
        log.info("comparator_stopped", **self._summary())
        return self.progress

    async def _turn(self, *, block: bool) -> int:
        """Every shard in turn: reclaim, then read what is new; when no shard had anything, wait for new
        records on one shard's stream (in rotation, ``block_ms`` split between the shards: a blocking read
        cannot span the slots of several shards on a cluster)."""
        handled = 0
        claimed_any = False
        for shard in self.shards:
            claimed = await shard.reclaim(self._config.claim_idle_ms, self._config.batch_size)
            self.progress.reclaimed += len(claimed.entries)
            claimed_any = claimed_any or bool(claimed.entries)
            handled += await self._process(shard, claimed)
            handled += await self._process(shard, await shard.read_new(self._config.batch_size, 0))
        if handled:
            return handled
        if block and self._config.block_ms:
            shard = self.shards[self._waits % len(self.shards)]
            self._waits += 1
            wait_ms = max(1, self._config.block_ms // len(self.shards))
            return await self._process(shard, await shard.read_new(self._config.batch_size, wait_ms))
        if not block and not claimed_any and await self._pending() > 0:
            # Burst mode: give entries held by a dead consumer the chance to go idle and be reclaimed.
            await asyncio.sleep(min(0.2, self._config.claim_idle_ms / 1000.0))
        return 0

    async def _process(self, shard: RecordConsumer, batch: Batch) -> int:
        self.progress.trimmed += batch.trimmed
        self.progress.deleted += batch.deleted
        if batch.trimmed:
            log.warning("records_trimmed_unread", count=batch.trimmed, consumer=self.consumer)
        entries = batch.entries
        if not entries:
            return 0
        parsed: list[tuple[Entry, Record]] = []
        for entry in entries:
            try:
                record = parse_record(entry[1])
            except PoisonRecord as exc:
                await self._dead_letter(shard, entry, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - any failure on one record is that record's
                await self._dead_letter(shard, entry, f"{type(exc).__name__}: {exc}")
                continue
            self._count_parse_errors(record)
            parsed.append((entry, record))
        records = [record for _, record in parsed]
        semantic = await self._semantic_scores(records)
        judged = await self._judge_verdicts(records)
        found: list[Contribution] = []
        for entry, record in parsed:
            try:
                found += contributions(record, self._settings, semantic, judged)
            except RecursionError:
                await self._dead_letter(shard, entry, "too_deep")
            except Exception as exc:  # noqa: BLE001 - a record that breaks the measures is set aside, not fatal
                await self._dead_letter(shard, entry, f"{type(exc).__name__}: {exc}")
        # Written to the aggregates of the records' own shard (its slot), seen markers included.
        applied = await self.aggregates.apply(found, shard=shard.keys.index)
        # Acknowledge only after the aggregates are durably written (at least once).
        await shard.ack([entry_id for entry_id, _ in entries])
        self.progress.read += len(entries)
        self.progress.applied += applied
        self.progress.duplicates += len(found) - applied
        return len(entries)

    async def _dead_letter(self, shard: RecordConsumer, entry: Entry, reason: str) -> None:
        entry_id, fields = entry
        await shard.dead_letter(entry_id, fields, reason)
        self.progress.dead_lettered += 1
        log.warning("record_dead_lettered", entry_id=entry_id.decode(), reason=reason[:200])

    async def _semantic_scores(self, records: list[Record]) -> Semantic | None:
        """The batch's semantic scores when an embeddings endpoint is configured; its failures are counted."""
        if self._semantic is None or not records:
            return None
        semantic = await self._semantic.scores(records)
        for reason in sorted(set(semantic.fallbacks.values())):
            self.progress.semantic_fallbacks[reason] = self.progress.semantic_fallbacks.get(reason, 0) + 1
            log.warning("semantic_fallback", reason=reason, pairs=len(semantic.fallbacks))
        return semantic

    async def _judge_verdicts(self, records: list[Record]) -> Judged | None:
        """The judge's verdicts on the batch's sampled pairs when a judge is configured; skips are counted."""
        if self._judge is None or not records:
            return None
        judged = await self._judge.verdicts(records)
        self.progress.judged += len(judged.outcomes)
        for reason in judged.skipped.values():
            self.progress.judge_skipped[reason] = self.progress.judge_skipped.get(reason, 0) + 1
        if judged.skipped:
            log.warning("judge_skipped", reasons=sorted(set(judged.skipped.values())), pairs=len(judged.skipped))
        return judged

    def _count_parse_errors(self, record: Record) -> None:
        errors = self.progress.parse_errors
        for arm in record.arms.values():
            if arm.output.parse_error:
                errors[arm.output.parse_error] = errors.get(arm.output.parse_error, 0) + 1

    def _summary(self) -> dict[str, object]:
        p = self.progress
        return {
            "consumer": self.consumer,
            "read": p.read,
            "applied": p.applied,
            "duplicates": p.duplicates,
            "dead_lettered": p.dead_lettered,
            "reclaimed": p.reclaimed,
            "trimmed": p.trimmed,
            "deleted": p.deleted,
            "redis_errors": p.redis_errors,
            "parse_errors": dict(p.parse_errors),
            "semantic_fallbacks": dict(p.semantic_fallbacks),
            "judged": p.judged,
            "judge_skipped": dict(p.judge_skipped),
        }

    async def _heartbeat(self) -> None:
        status = {
            **self._summary(),
            "time": time.time(),
            "started": self.progress.started,
            "health": self.health.as_dict(),
        }
        await self.records.heartbeat(status, self._config.health_ttl)

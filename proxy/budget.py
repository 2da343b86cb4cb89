"""A candidate's spend over the last hour, so mirrors stop (reason ``budget``) once it is used up.

The ledger is pure: minute buckets on a ring, added to as mirrors finish, summed over the last
60 minutes. With several proxy processes each one adds its own spend to a Redis counter per
candidate and minute (``SpendSync``) and reads back the total of every process,
so the budget is one budget for the deployment, not one per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .comparator.parse import parse_body, prompt_text
from .comparator.pricing import PriceBook, Usage, count_tokens
from .config import CandidateConfig
from .exchange import ArmCapture
from .redis import StoreUnavailable
from .supervisor import Health, Supervisor, start_loop

BUCKET_SECONDS = 60
BUCKETS = 60  # one hour


class SpendStore(Protocol):
    """What the sync needs from Redis (``redis.RecordWriter``)."""

    async def sync_spend(
        self, candidate: str, added: dict[int, float], minutes: Sequence[int], ttl: int
    ) -> dict[int, float]: ...


@dataclass(slots=True)
class SpendLedger:
    """Spend per minute over a sliding hour: local additions and the deployment's total when known."""

    budget_per_hour: float
    _local: dict[int, float] = field(default_factory=dict)
    _unsynced: dict[int, float] = field(default_factory=dict)
    _shared: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def minute(now: float) -> int:
        return int(now // BUCKET_SECONDS)

    def add(self, amount: float, now: float) -> None:
        """Account a finished mirror's cost."""
        if amount <= 0:
            return
        minute = self.minute(now)
        self._local[minute] = self._local.get(minute, 0.0) + amount
        self._unsynced[minute] = self._unsynced.get(minute, 0.0) + amount
        self._forget(minute)

    def spent(self, now: float) -> float:
        """Spend over the last hour: the deployment's total where it was read, else this process's own."""
        first = self.minute(now) - BUCKETS + 1
        minutes = {m for m in (*self._local, *self._shared) if m >= first}
        total = 0.0
        for m in minutes:
            # The shared figure includes what this process wrote up to the last sync; add what it has not.
            total += max(self._shared.get(m, 0.0) + self._unsynced.get(m, 0.0), self._local.get(m, 0.0))
        return total

    def exhausted(self, now: float) -> bool:
        return self.budget_per_hour > 0 and self.spent(now) >= self.budget_per_hour

    def take_unsynced(self) -> dict[int, float]:
        """Local additions not yet written to the shared counters (and forget them)."""
        pending, self._unsynced = self._unsynced, {}
        return pending

    def restore_unsynced(self, pending: dict[int, float]) -> None:
        """Put back additions whose write failed, so the next sync retries them."""
        for minute, amount in pending.items():
            self._unsynced[minute] = self._unsynced.get(minute, 0.0) + amount

    def set_shared(self, totals: dict[int, float], now: float) -> None:
        """The deployment's spend per minute, as read from the shared counters."""
        self._shared = dict(totals)
        self._forget(self.minute(now))

    def _forget(self, minute: int) -> None:
        oldest = minute - BUCKETS
        for book in (self._local, self._unsynced, self._shared):
            for m in [m for m in book if m <= oldest]:
                del book[m]


class SpendSync:
    """Shares each candidate's spend between proxy processes through Redis, once per interval.

    A failed sync keeps the additions for the next one; meanwhile each process holds to the budget
    with what it knows (its own spend plus the total last read).
    """

    def __init__(
        self, store: SpendStore, ledgers: dict[str, SpendLedger], *, interval: float = 1.0, health: Health | None = None
    ) -> None:
        self._store = store
        self.health = health or Health("spend-sync")
        self._ledgers = ledgers
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self, supervisor: Supervisor | None = None) -> None:
        if self._ledgers:
            self._task = start_loop(supervisor, self.health.name, self.run)

    async def sync(self, now: float) -> None:
        minute = SpendLedger.minute(now)
        minutes = list(range(minute - BUCKETS + 1, minute + 1))
        for name, ledger in self._ledgers.items():
            added = ledger.take_unsynced()
            try:
                totals = await self._store.sync_spend(name, added, minutes, 2 * BUCKETS * BUCKET_SECONDS)
            except StoreUnavailable as exc:
                ledger.restore_unsynced(added)
                self.health.down(f"redis {exc.kind}")
                continue
            self.health.up()
            ledger.set_shared(totals, now)

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.sync(time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            await self.sync(time.time())  # what was spent since the last turn


# The last "usage" object of a body (one level of nesting: OpenAI's *_tokens_details, Anthropic's cache fields).
_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
HEAD_BYTES = 16 * 1024
BUDGET_CAPTURE = 64 * 1024  # the answer text kept for counting tokens when no usage is reported


def usage_in(data: bytes) -> dict[str, int]:
    """Token counts of the last usage object in ``data``, in OpenAI's convention (prompt includes cached,
    completion includes reasoning): keys among prompt, completion, cached, reasoning."""
    found: dict[str, int] = {}
    for match in _USAGE.finditer(data):
        try:
            usage = orjson.loads(match.group(1))
        except orjson.JSONDecodeError:
            continue
        if isinstance(usage, dict):
            found.update(_tokens(usage))
    return found


def _tokens(usage: dict[str, Any]) -> dict[str, int]:
    def number(*keys: str, within: Any = usage) -> int | None:
        for key in keys:
            value = within.get(key) if isinstance(within, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    out: dict[str, int] = {}
    prompt = number("prompt_tokens", "input_tokens")
    cache_read = number("cache_read_input_tokens") or 0
    if prompt is not None:
        # Anthropic counts cache reads and writes apart from input_tokens; OpenAI includes cached tokens.
        out["prompt"] = prompt + cache_read + (number("cache_creation_input_tokens") or 0)
    completion = number("completion_tokens", "output_tokens")
    if completion is not None:
        out["completion"] = completion
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = number("cached_tokens", within=details) or cache_read
    if cached:
        out["cached"] = cached
    reasoning = number(
        "reasoning_tokens", within=usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    )
    if reasoning:
        out["reasoning"] = reasoning
    return out


class MirrorCost:
    """The cost of one finished mirror: the usage its answer reports (found in its first and last bytes, so
    a long stream cut by the capture cap still counts), else tokens counted from its text (scaled up to the
    bytes received when the capture was cut), priced by the candidate's table, else the maintained list.
    None when no price is known for its model."""

    def __init__(self, candidate: CandidateConfig) -> None:
        price = candidate.price
        table = (price.input_per_1k, price.output_per_1k) if price.input_per_1k or price.output_per_1k else None
        self._book = PriceBook(table)

    def unpriced(self, model: str) -> bool:
        """Whether answers of this model would have no price (no table, and a model the list does not know)."""
        return self._book.price(model, Usage(1, 1)).amount is None

    def __call__(self, arm: ArmCapture, request_body: bytes) -> float | None:
        head = b"".join(arm.chunks)[:HEAD_BYTES] if arm.chunks else b""
        tokens = usage_in(head)
        tokens.update(usage_in(bytes(arm.tail or b"")))
        model = arm.model or _model(request_body)
        if "completion" not in tokens:
            tokens["completion"] = self._counted_answer(arm, model)
        if "prompt" not in tokens:
            tokens["prompt"] = count_tokens(model, prompt_text(request_body))[0]
        cached = min(tokens.get("cached", 0), tokens["prompt"])
        reasoning = min(tokens.get("reasoning", 0), tokens["completion"])
        return self._book.price(model, Usage(tokens["prompt"], tokens["completion"], cached, reasoning)).amount

    @staticmethod
    def _counted_answer(arm: ArmCapture, model: str | None) -> int:
        headers = {k.lower(): v for k, v in arm.headers}
        output = parse_body(arm.body, headers.get("content-type", ""), truncated=arm.truncated)
        counted = count_tokens(model, output.text or "")[0]
        if arm.truncated and arm.captured:
            counted = int(counted * arm.size / arm.captured)  # the rest of the answer was not kept
        return counted


def _model(request_body: bytes) -> str | None:
    match = _MODEL.search(request_body)
    return match.group(1).decode(errors="replace") if match else None

"""``shadow-proxy replay``: re-send recorded requests to a candidate and record the new pairs.

Each replayed record keeps the original live arm (what the incumbent answered then) and gets a new
shadow arm from the candidate now; its request id is ``replay:<session>:<original id>`` and its meta
says which entry it replays. Requests whose recorded body was truncated, or whose headers were
redacted, cannot be replayed faithfully: the first are skipped and counted, redacted headers are
dropped (pass credentials the candidate needs with ``--header``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..config import Config, canary_candidate
from ..exchange import SCHEMA_VERSION, ArmCapture, content_encoding, now
from ..headers import end_to_end
from ..redaction import Redactor
from ..redis import Clients, Keys, RecordWriter
from ..redis.records import read_records
from ..upstream import Upstream

_SKIP_HEADERS = frozenset({"host", "content-length", "x-request-id"})


@dataclass(slots=True)
class ReplayProgress:
    total: int = 0
    sent: int = 0
    recorded: int = 0
    failed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    last_entry: str | None = None

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


async def load_entries(config: Config, redis_url: str, *, last: int | None, since: float | None) -> list[Any]:
    """Records to replay, oldest first: the last N, or everything since a Unix time."""
    clients = Clients(redis_url, socket_timeout=config.record.socket_timeout)
    try:
        keys = Keys(config.record.namespace, config.record.stream, config.record.shards)
        return list(await read_records(clients.get("control"), keys, last=last, since=since))
    finally:
        await clients.close()


def _request(
    fields: dict[bytes, bytes], marker: str, extra: list[tuple[str, str]]
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    meta = orjson.loads(fields[b"meta"])
    headers = [(k, v) for k, v in meta["request"]["headers"] if v != marker and k not in _SKIP_HEADERS]
    names = {k.lower() for k, _ in extra}
    return meta, [*end_to_end((k, v) for k, v in headers if k.lower() not in names), *extra]


class Replayer:
    """Sends recorded requests to one upstream at a fixed rate and records the pairs."""

    def __init__(
        self, config: Config, redis_url: str, *, headers: list[tuple[str, str]], name: str | None = None
    ) -> None:
        record = config.record
        self._config = config
        target = next((c for c in config.candidate if c.name == name), None) if name else canary_candidate(config)
        assert target is not None, "replay needs a candidate (checked by the command)"
        self._upstream = Upstream(target.name, target)
        self._clients = Clients(redis_url, socket_timeout=record.socket_timeout)
        self._store = RecordWriter(
            self._clients.get("records"), Keys(record.namespace, record.stream, record.shards), maxlen=record.maxlen
        )
        self._redactor = Redactor(record)
        self._headers = headers
        self.session = uuid.uuid4().hex[:8]
        self.progress = ReplayProgress()

    async def run(
        self, entries: list[Any], *, rate: float, concurrency: int, on_done: Callable[[], None] | None = None
    ) -> ReplayProgress:
        self.progress.total = len(entries)
        await self._upstream.start()
        semaphore = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()
        try:
            for entry_id, fields in entries:
                await semaphore.acquire()
                task = asyncio.create_task(self._one(entry_id, fields, semaphore, on_done))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(1 / rate)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._upstream.close()
            await self._clients.close()
        return self.progress

    async def _one(
        self,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        semaphore: asyncio.Semaphore,
        on_done: Callable[[], None] | None,
    ) -> None:
        try:
            await self._replay(entry_id, fields)
        finally:
            semaphore.release()
            self.progress.last_entry = entry_id.decode()
            if on_done is not None:
                on_done()

    async def _replay(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            meta, headers = _request(fields, self._config.record.redact_marker, self._headers)
        except (KeyError, ValueError):
            self.progress.skip("unreadable")
            return
        if meta["request"].get("truncated"):
            self.progress.skip("truncated_body")
            return
        body = fields.get(b"body.request", b"")
        target = meta["path"] + (f"?{meta['query']}" if meta.get("query") else "")
        arm = ArmCapture(self._upstream.name, "shadow", self._config.record.max_body_bytes, start=now())
        origin = arm.start
        self.progress.sent += 1
        shaped = self._upstream.shaping.apply(body, headers)
        arm.model = shaped.model
        if await self._upstream.capture(arm, meta["method"], target, shaped.headers, shaped.body) is not None:
            self.progress.failed += 1
        await self._record(entry_id, fields, meta, arm, origin)

    async def _record(
        self, entry_id: bytes, fields: dict[bytes, bytes], meta: dict[str, Any], arm: ArmCapture, origin: float
    ) -> None:
        request_id = f"replay:{self.session}:{meta['request_id']}"
        summary = arm.summary(origin)
        summary["headers"] = self._redactor.headers([(k, v) for k, v in summary["headers"]])
        meta = {
            **meta,
            "request_id": request_id,
            "time": time.time(),
            "original_time": meta["time"],
            "replay": {"of": entry_id.decode(), "session": self.session},
            "v": SCHEMA_VERSION,
            "arms": {"live": meta["arms"]["live"], f"shadow.{arm.upstream}": summary},
            "shadow_skipped": None,
        }
        # The original live arm is kept; every other arm (its mirrors, the A/A copy) is replaced.
        new = {k: v for k, v in fields.items() if not k.startswith((b"body.shadow", b"body.noise")) and k != b"seq"}
        new[b"v"] = str(SCHEMA_VERSION).encode()
        new[b"request_id"] = request_id.encode()
        new[b"meta"] = orjson.dumps(meta)
        new[f"body.shadow.{arm.upstream}".encode()] = self._redactor.body(
            arm.body, arm.truncated, content_encoding(arm.headers)
        )
        await self._store.append([new])
        self.progress.recorded += 1

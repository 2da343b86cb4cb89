"""The data model of one proxied request: what each arm did, captured cheaply on the hot path.

The hot path only appends bytes and timestamps (``ArmCapture.on_chunk``). Turning a capture into
the versioned wire format (``Exchange.to_fields``), with summaries and redaction, happens later in
the recorder's writer task. The wire format is documented in ``docs/records.md``.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

# Version 2: one arm per candidate (``shadow.<name>``), per-candidate skip reasons, the model each arm
# was asked for. Readers accept 1 as well (docs/records.md).
SCHEMA_VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})
MAX_GAPS = 4096  # inter-chunk gaps kept per arm; beyond this only count, sum and max grow
TAIL_BYTES = 16 * 1024  # where a streamed answer reports its usage: its last events

# Response headers never worth recording (and Set-Cookie is a secret).
_SKIP_RESPONSE_HEADERS = frozenset({"set-cookie", "date", "connection", "keep-alive", "transfer-encoding"})


@dataclass(slots=True)
class ArmCapture:
    """One arm's outcome: status or error class, timings (monotonic seconds) and captured body."""

    upstream: str
    role: str
    cap: int
    start: float = 0.0
    model: str | None = None  # the model this arm was asked for, when shaping rewrote it
    first_byte: float | None = None
    first_chunk: float | None = None
    end: float | None = None
    status: int | None = None
    error: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    captured: int = 0
    size: int = 0
    chunk_count: int = 0
    last_chunk: float = 0.0
    gap_sum: float = 0.0
    gap_max: float = 0.0
    gaps: array[float] = field(default_factory=lambda: array("d"))
    tail: bytearray | None = None  # the last TAIL_BYTES of the body, kept only when a spend budget needs them

    def on_headers(self, status: int, headers: list[tuple[str, str]], now: float) -> None:
        self.status = status
        self.headers = headers
        self.first_byte = now

    def on_chunk(self, data: bytes, now: float) -> None:
        """Account one chunk: the only per-chunk work the live path does for recording."""
        if self.chunk_count:
            gap = now - self.last_chunk
            self.gap_sum += gap
            if gap > self.gap_max:
                self.gap_max = gap
            if len(self.gaps) < MAX_GAPS:
                self.gaps.append(gap)
        else:
            self.first_chunk = now
        self.chunk_count += 1
        self.last_chunk = now
        self.size += len(data)
        room = self.cap - self.captured
        if room > 0:
            piece = data if len(data) <= room else data[:room]
            self.chunks.append(piece)
            self.captured += len(piece)
        if self.tail is not None:
            self.tail += data[-TAIL_BYTES:]
            if len(self.tail) > TAIL_BYTES:
                del self.tail[: len(self.tail) - TAIL_BYTES]

    def finish(self, now: float, error: str | None = None) -> None:
        if self.end is None:
            self.end = now
        if error is not None and self.error is None:
            self.error = error

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def truncated(self) -> bool:
        return self.size > self.captured

    def summary(self, origin: float) -> dict[str, Any]:
        """The arm as wire-format metadata; times in ms relative to the request's arrival."""

        gaps = sorted(self.gaps) if self.gaps else []
        many = self.chunk_count > 1
        return {
            "upstream": self.upstream,
            "role": self.role,
            "model": self.model,
            "status": self.status,
            "error": self.error,
            "start_ms": _delta(origin, self.start),
            "first_byte_ms": _delta(origin, self.first_byte),
            "first_chunk_ms": _delta(origin, self.first_chunk),
            "end_ms": _delta(origin, self.end),
            "ttfb_ms": _delta(self.start, self.first_byte),
            "duration_ms": _delta(self.start, self.end),
            "chunks": {
                "count": self.chunk_count,
                "gap_mean_ms": round(self.gap_sum / (self.chunk_count - 1) * 1000.0, 3) if many else None,
                "gap_p50_ms": _quantile_ms(gaps, 0.50),
                "gap_p95_ms": _quantile_ms(gaps, 0.95),
                "gap_max_ms": round(self.gap_max * 1000.0, 3) if many else None,
            },
            "headers": [[k.lower(), v] for k, v in self.headers if k.lower() not in _SKIP_RESPONSE_HEADERS],
            "bytes": self.size,
            "captured_bytes": self.captured,
            "truncated": self.truncated,
        }


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000.0, 3)


def _quantile_ms(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0, 3)


@dataclass(slots=True)
class Exchange:
    """One client request and what both arms did with it; recorded once both arms have ended."""

    request_id: str
    method: str
    path: str
    query: str
    route: str
    headers: list[tuple[str, str]]
    client_ip: str
    received_wall: float
    received: float
    body: bytes = b""
    live: ArmCapture | None = None
    shadows: list[ArmCapture] = field(default_factory=list)
    noise: ArmCapture | None = None
    shadow_skipped: dict[str, str] = field(default_factory=dict)  # candidate name -> why it got no mirror
    client_request_id: str | None = None  # the client's own x-request-id, when it sent one
    client_disconnected: bool = False
    response_status: int | None = None
    pending: int = 0
    on_complete: Callable[[Exchange], None] | None = None

    def expect_arm(self) -> None:
        self.pending += 1

    def arm_done(self) -> None:
        """Called once per arm; the last one to finish hands the exchange to the recorder."""
        self.pending -= 1
        if self.pending == 0 and self.on_complete is not None:
            callback, self.on_complete = self.on_complete, None
            callback(self)

    def size_hint(self, cap: int) -> int:
        """Approximate bytes its record will hold (bodies cut at ``cap``), for the recorder's byte bound."""
        size = min(len(self.body), cap) + 512
        for arm in self.arms():
            size += arm.captured + 256
        return size

    def arms(self) -> list[ArmCapture]:
        return [a for a in (self.live, *self.shadows, self.noise) if a is not None]

    def to_fields(self, redact: Redaction, cap: int) -> dict[str, bytes]:
        """The stream entry: small fields for filtering, JSON metadata, raw (redacted) bodies."""
        meta = {
            "v": SCHEMA_VERSION,
            "request_id": self.request_id,
            "client_request_id": self.client_request_id,
            "time": self.received_wall,
            "method": self.method,
            "path": self.path,
            "query": redact.query(self.query),
            "route": self.route,
            "client_ip": self.client_ip,
            "request": {
                "headers": redact.headers(self.headers),
                "bytes": len(self.body),
                "captured_bytes": min(len(self.body), cap),
                "truncated": len(self.body) > cap,
            },
            "served_by": self.live.upstream if self.live else None,
            "client_disconnected": self.client_disconnected,
            "response_status": self.response_status
            if self.response_status is not None
            else (self.live.status if self.live else None),
            "shadow_skipped": self.shadow_skipped or None,
        }
        fields = {
            "v": str(SCHEMA_VERSION).encode(),
            "request_id": self.request_id.encode(),
            # The id the client knows (feedback names it): its own, else ours.
            "client_request_id": (self.client_request_id or self.request_id).encode(),
            "served_by": (self.live.upstream if self.live else "").encode(),
            "body.request": redact.body(self.body[:cap], len(self.body) > cap, content_encoding(self.headers)),
        }
        arms: dict[str, Any] = {}
        for key, arm in self._keyed_arms():
            summary = arm.summary(self.received)
            summary["headers"] = redact.headers([(k, v) for k, v in summary["headers"]])
            arms[key] = summary
            fields[f"body.{key}"] = redact.body(arm.body, arm.truncated, content_encoding(arm.headers))
        meta["arms"] = arms
        fields["meta"] = orjson.dumps(meta)
        return fields

    def _keyed_arms(self) -> list[tuple[str, ArmCapture]]:
        """Each arm under its wire key: live, shadow.<upstream name>, noise."""
        keyed = [("live", self.live)] if self.live is not None else []
        keyed += [(f"shadow.{arm.upstream}", arm) for arm in self.shadows]
        if self.noise is not None:
            keyed.append(("noise", self.noise))
        return keyed


class Redaction(Protocol):
    """What ``to_fields`` needs from the redactor (implemented in ``redaction.py``)."""

    def headers(self, items: list[tuple[str, str]]) -> list[list[str]]: ...

    def query(self, query: str) -> str: ...

    def body(self, body: bytes, truncated: bool, encoding: str = "") -> bytes: ...


def content_encoding(headers: list[tuple[str, str]]) -> str:
    """The Content-Encoding a body travelled with ("" when none): redaction inflates to check it."""
    return next((value for name, value in headers if name.lower() == "content-encoding"), "")


def now() -> float:
    """The monotonic clock every timing in an exchange is measured on."""
    return time.perf_counter()

"""From raw recorded bytes to what each arm answered: record metadata, encodings, SSE or NDJSON framing, JSON, text.

Runs in the comparator, never in the proxy. A record (``docs/records.md``) holds each arm's body exactly as
it travelled; here it is decompressed, told apart as an SSE stream, newline-delimited JSON (a stream of one
JSON object a line, by its content type or its lines), a JSON document or text, and handed to ``shapes.py``,
which knows the answers of OpenAI (chat, completions, embeddings, Responses), Anthropic (Messages), TGI and
Ollama, reads any other document as generic JSON and any other stream as text.

Invariants: ``parse_record`` raises nothing but PoisonRecord, and ``parse_body`` raises nothing: a body
that looks like a known shape but cannot be read in part still counts, with ``Output.parse_error`` saying
why. A capture cut by the proxy's body cap (``truncated``) is a partial answer, never a
``truncated_stream`` error.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from ..exchange import READABLE_VERSIONS
from .shapes import (
    ANTHROPIC,
    CHAT,
    COMPLETION,
    EMBEDDING,
    NDJSON,
    OLLAMA,
    RESPONSES,
    STREAM_ERROR,
    TGI,
    TRUNCATED_STREAM,
    Output,
    parse_document,
    stream_output,
    text_of,
    too_deep,
)

__all__ = [
    "STREAM_ERROR",
    "TRUNCATED_STREAM",
    "Arm",
    "Output",
    "PoisonRecord",
    "Record",
    "parse_body",
    "parse_document",
    "parse_ndjson",
    "parse_record",
    "parse_sse",
    "prompt_text",
]

DECODED_CAP = 64 * 1024 * 1024  # a compressed body never inflates past this (a gzip bomb is cut, as truncated)

_SSE_START = re.compile(rb"\s*(?:data|event|id|retry):")
_FIRST = re.compile(rb"\s*(\S)")
_MARKER = re.compile(rb'"(object|type)"\s*:\s*"([\w.]+)"')


class PoisonRecord(ValueError):
    """A stream entry that is not a record this comparator can read (sent to the dead-letter stream)."""


@dataclass(frozen=True, slots=True)
class Arm:
    """One arm of a record: outcome, timings and parsed output."""

    upstream: str
    role: str
    status: int | None
    error: str | None
    duration_ms: float | None
    ttfb_ms: float | None
    ttft_ms: float | None
    gap_p50_ms: float | None
    body_truncated: bool
    output: Output
    model: str | None = None  # the model this arm was asked for, when shaping rewrote it (version 2)

    @property
    def outcome(self) -> str | None:
        """None for a clean success, else the error class the comparator counts."""
        if self.error:
            return self.error
        if self.status is None:
            return "no_response"
        if self.status >= 500:
            return "http_5xx"
        if self.status >= 400:
            return "http_4xx"
        if self.output.stream_error:
            return self.output.stream_error
        return None


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed record: request facts and its arms by key (live, shadow or shadow.<name>, noise)."""

    request_id: str
    time: float
    route: str
    model: str
    streaming: bool
    prompt_text: str
    arms: dict[str, Arm] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # mirror target -> why it got no mirror
    client_request_id: str | None = None  # the client's own x-request-id, when it sent one


def parse_record(fields: dict[bytes, bytes]) -> Record:
    """Parse one stream entry; raise PoisonRecord (and nothing else) when it is not a readable record."""
    try:
        return _record(fields)
    except PoisonRecord:
        raise
    except RecursionError:
        raise PoisonRecord("too_deep") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as exc:
        raise PoisonRecord(f"{type(exc).__name__}: {exc}") from None


def _record(fields: dict[bytes, bytes]) -> Record:
    meta = orjson.loads(fields[b"meta"])
    version = meta.get("v") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise PoisonRecord(f"unsupported schema version {version!r}")
    request = _json(fields.get(b"body.request", b""))
    request = request if isinstance(request, dict) else {}
    model = request.get("model")
    arms = {str(key): _arm(arm, fields.get(f"body.{key}".encode(), b"")) for key, arm in meta["arms"].items()}
    return Record(
        request_id=str(meta["request_id"]),
        time=float(meta["time"]),
        route=str(meta.get("route", "other")),
        model=model if isinstance(model, str) and model else "-",
        streaming=bool(request.get("stream")),
        prompt_text=_prompt(request),
        arms=arms,
        skipped=_skipped(meta.get("shadow_skipped")),
        client_request_id=meta["client_request_id"] if isinstance(meta.get("client_request_id"), str) else None,
    )


def _skipped(value: Any) -> dict[str, str]:
    """Skip reasons per mirror target; version 1 had one reason for its one candidate, named "candidate"."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str) and value != "no_candidate":
        return {"candidate": value}
    return {}


def _arm(meta: dict[str, Any], body: bytes) -> Arm:
    headers = {str(name).lower(): str(value) for name, value in meta.get("headers") or []}
    body, inflated_past_cap = _decode(body, headers.get("content-encoding", ""))
    truncated = bool(meta.get("truncated")) or inflated_past_cap
    output = parse_body(body, headers.get("content-type", ""), truncated=truncated)
    start, first_chunk = meta.get("start_ms"), meta.get("first_chunk_ms")
    ttft = None
    if output.streamed and start is not None and first_chunk is not None:
        ttft = round(first_chunk - start, 3)
    elif meta.get("duration_ms") is not None:
        # A non-streamed answer delivers its first token with its last byte.
        ttft = meta["duration_ms"]
    return Arm(
        upstream=meta["upstream"],
        role=meta["role"],
        status=meta.get("status"),
        error=meta.get("error"),
        duration_ms=meta.get("duration_ms"),
        ttfb_ms=meta.get("ttfb_ms"),
        ttft_ms=ttft,
        gap_p50_ms=(meta.get("chunks") or {}).get("gap_p50_ms"),
        body_truncated=bool(meta.get("truncated")),
        output=output,
        model=meta["model"] if isinstance(meta.get("model"), str) else None,
    )


def _decode(body: bytes, encoding: str) -> tuple[bytes, bool]:
    """Undo Content-Encoding (the proxy records bodies exactly as they travelled); True when inflation hit
    DECODED_CAP. A compressed body cut by the proxy's cap still inflates as far as it goes."""
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15}.get(encoding.strip().lower())
    if wbits is None or not body:
        return body, False
    inflater = zlib.decompressobj(wbits)
    try:
        return inflater.decompress(body, DECODED_CAP), bool(inflater.unconsumed_tail)
    except zlib.error:
        return body, False


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def prompt_text(request_body: bytes) -> str:
    """The prompt of a raw request body, for token estimates ("" when it is not a JSON object)."""
    try:
        return _prompt(_json(request_body))
    except RecursionError:
        return ""


def _prompt(request: Any) -> str:
    """System prompt or instructions, then chat or Anthropic ``messages`` (string contents or lists of text
    blocks), Responses ``input`` (a string or message items), a completion ``prompt`` or TGI's ``inputs``."""
    if not isinstance(request, dict):
        return ""
    parts = [text_of(request.get("system")), text_of(request.get("instructions"))]
    messages = request.get("messages")
    if isinstance(messages, list):
        parts.extend(text_of(m.get("content")) for m in messages if isinstance(m, dict))
    else:
        parts.append(_prompt_value(request.get("prompt") or request.get("input") or request.get("inputs") or ""))
    return " ".join(part for part in parts if part)


def _prompt_value(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(item, dict) for item in prompt):
        # Responses input items: messages (string or part-list content) and tool outputs.
        return " ".join(text_of(item.get("content", item.get("output"))) for item in prompt)
    try:
        return orjson.dumps(prompt).decode()  # token ids, embedding inputs
    except orjson.JSONEncodeError:
        return ""


def parse_body(body: bytes, content_type: str, *, truncated: bool = False) -> Output:
    """What an arm answered: a reassembled SSE or NDJSON stream, a JSON answer read by its shape, else text.

    Never raises: what cannot be read is a ``parse_error``; ``truncated`` (the proxy's body cap cut the
    capture) gives a best-effort partial answer.
    """
    if not body:
        return Output("empty", shape="empty", truncated=truncated)
    content_type = content_type.lower()
    try:
        if _is_stream(body, content_type):
            return parse_sse(body, truncated=truncated)
        if "ndjson" in content_type or "jsonl" in content_type:  # application/x-ndjson (Ollama), application/jsonl
            return parse_ndjson(body, truncated=truncated)
        return _plain(body, content_type, truncated)
    except RecursionError:
        return _unreadable(body, "too_deep", truncated)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError):
        # The readers check every type they touch; this keeps the record countable if one was missed.
        return _unreadable(body, "unreadable", truncated)


def _is_stream(body: bytes, content_type: str) -> bool:
    # A JSON body is read as JSON even when labelled as a stream (some servers send errors that way).
    return bool(_SSE_START.match(body)) or ("text/event-stream" in content_type and not _looks_json(body))


def _looks_json(body: bytes) -> bool:
    first = _FIRST.match(body)
    return first is not None and first.group(1) in (b"{", b"[")


def _plain(body: bytes, content_type: str, truncated: bool) -> Output:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if _is_ndjson(body):
            return parse_ndjson(body, truncated=truncated)
        if not _looks_json(body) and "json" not in content_type:
            return Output("text", text=body.decode("utf-8", errors="replace"), shape="text", truncated=truncated)
        reason = "too_deep" if "depth" in str(exc) else "bad_json"
        return _unreadable(body, None if truncated else reason, truncated)
    if too_deep(doc, body.count(b"{") + body.count(b"[")):
        return _unreadable(body, "too_deep", truncated)
    output = parse_document(doc)
    return replace(output, truncated=True) if truncated else output


def _is_ndjson(body: bytes) -> bool:
    """Several lines, the first a JSON object: newline-delimited JSON sent without its content type."""
    first, newline, rest = body.lstrip().partition(b"\n")
    return bool(newline and rest.strip()) and isinstance(_json(first), dict)


def _unreadable(body: bytes, reason: str | None, truncated: bool) -> Output:
    """A body that looks like JSON but cannot be read (or was cut): its text, and the shape it seems to have."""
    text = body.decode("utf-8", errors="replace")
    return Output("text", text=text, shape=_sniff(body), truncated=truncated, parse_error=reason)


def _sniff(body: bytes) -> str:
    """The shape a body seems to have from its first ``object``/``type`` markers (for bodies that do not parse)."""
    for match in _MARKER.finditer(body, 0, 4096):
        key, value = match.groups()
        if key == b"object" and value.startswith(b"chat.completion"):
            return CHAT
        if key == b"object" and value in (b"text_completion", b"response", b"embedding"):
            return {b"text_completion": COMPLETION, b"response": RESPONSES, b"embedding": EMBEDDING}[value]
        if key == b"type" and value.startswith(b"response."):
            return RESPONSES
        if key == b"type" and value in (b"message", b"message_start", b"error"):
            return ANTHROPIC
    head = body[:4096]
    if b'"generated_text"' in head:
        return TGI
    if b'"created_at"' in head and (b'"response"' in head or b'"message"' in head):
        return OLLAMA
    return "json"


def parse_sse(body: bytes, *, truncated: bool = False) -> Output:
    """Reassemble a server-sent event stream (OpenAI chat or completions, Responses API, Anthropic Messages,
    TGI; any other format as text).

    An event whose data is not JSON is skipped and counted as ``bad_sse_event``, except the last one when
    the body does not end with a blank line: that is where the stream was cut. When no event could be read,
    the bytes' markers tell the API (a stream cut inside its first event is still that API's).
    """
    blocks = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")
    events: list[tuple[str, dict[str, Any]]] = []
    bad = False
    for position, block in enumerate(blocks):
        name, data = _sse_fields(block)
        if data is None:
            continue
        if data.strip() == b"[DONE]":
            events.append(("[DONE]", {}))
            continue
        event = _json(data)
        if isinstance(event, dict):
            events.append((name, event))
        elif position < len(blocks) - 1:
            bad = True
    hint = None if events else _sniff(body)
    out = stream_output(events, truncated=truncated, parse_error="bad_sse_event" if bad else None, hint=hint)
    if out.text is None:  # an unknown format whose events have no text field: each event's data, one a line
        datas = (_sse_fields(block)[1] for block in blocks[:-1])  # the last block is empty, or cut unfinished
        return _with_data(out, [d for d in datas if d is not None and d.strip() != b"[DONE]"])
    return out


def parse_ndjson(body: bytes, *, truncated: bool = False) -> Output:
    """Reassemble newline-delimited JSON, one event a line (Ollama's native streams; any other format as text).

    A line that is not a JSON object is skipped and counted as ``bad_ndjson_line``, except an unterminated
    last one: that is where the stream was cut.
    """
    lines = body.split(b"\n")
    events: list[tuple[str, dict[str, Any]]] = []
    bad = False
    for position, line in enumerate(lines):
        if not line.strip():
            continue
        event = _json(line)
        if isinstance(event, dict):
            events.append(("", event))
        elif position < len(lines) - 1:
            bad = True
    hint = None if events else _sniff(body)
    error = "bad_ndjson_line" if bad else None
    out = stream_output(events, truncated=truncated, parse_error=error, framing=NDJSON, hint=hint)
    if out.text is None:  # an unknown format whose lines have no text field: the lines, but an unfinished last one
        complete = lines if _json(lines[-1]) is not None else lines[:-1]
        return _with_data(out, [line for line in complete if line.strip()])
    return out


def _with_data(out: Output, data: list[bytes]) -> Output:
    return replace(out, text="\n".join(d.decode("utf-8", errors="replace") for d in data))


def _sse_fields(block: bytes) -> tuple[str, bytes | None]:
    """An event's name and data (data lines joined, one leading space dropped, as the SSE spec says)."""
    if block.startswith(b"data: ") and b"\n" not in block:  # the usual one-line event
        return "", block[6:]
    name, data = "", []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", errors="replace")
    return name, b"\n".join(data) if data else None

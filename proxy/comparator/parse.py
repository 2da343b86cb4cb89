"""From raw recorded bytes to what a model answered: JSON, OpenAI-style SSE streams, embeddings, text.

Runs in the comparator, never in the proxy. OpenAI-compatible chat, completion and embedding
responses are recognised without configuration; anything else is generic JSON, text or bytes.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

TRUNCATED_STREAM = "truncated_stream"


class PoisonRecord(ValueError):
    """A stream entry that is not a record this comparator can read (sent to the dead-letter stream)."""


@dataclass(frozen=True, slots=True)
class Output:
    """What one arm answered, in comparable form."""

    kind: str  # chat | completion | embedding | json | text | empty
    text: str | None = None
    document: Any = None
    tool_calls: tuple[tuple[str, str], ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    embeddings: tuple[tuple[float, ...], ...] = ()
    label: str | None = None
    model: str | None = None
    streamed: bool = False
    stream_error: str | None = None


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
    """A parsed record: request facts and its arms by key (live, shadow, noise)."""

    request_id: str
    time: float
    route: str
    model: str
    streaming: bool
    prompt_text: str
    arms: dict[str, Arm] = field(default_factory=dict)


def parse_record(fields: dict[bytes, bytes]) -> Record:
    """Parse one stream entry; raise PoisonRecord when it is not a readable version-1 record."""
    try:
        meta = orjson.loads(fields[b"meta"])
        if meta.get("v") != 1:
            raise PoisonRecord(f"unsupported schema version {meta.get('v')!r}")
        request_body = fields.get(b"body.request", b"")
        request_doc = _json(request_body)
        model = request_doc.get("model") if isinstance(request_doc, dict) else None
        streaming = bool(request_doc.get("stream")) if isinstance(request_doc, dict) else False
        arms = {}
        for key, arm_meta in meta["arms"].items():
            body = fields.get(f"body.{key}".encode(), b"")
            arms[key] = _arm(arm_meta, body)
        return Record(
            request_id=str(meta["request_id"]),
            time=float(meta["time"]),
            route=str(meta.get("route", "other")),
            model=str(model) if model else "-",
            streaming=streaming,
            prompt_text=_prompt_text(request_doc),
            arms=arms,
        )
    except PoisonRecord:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PoisonRecord(f"{type(exc).__name__}: {exc}") from None


def _arm(meta: dict[str, Any], body: bytes) -> Arm:
    headers = {name: value for name, value in meta.get("headers", [])}
    body = _decode(body, headers.get("content-encoding", ""))
    content_type = headers.get("content-type", "")
    output = parse_body(body, content_type, truncated=bool(meta.get("truncated")))
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
    )


def _decode(body: bytes, encoding: str) -> bytes:
    """Undo Content-Encoding (the proxy records bodies exactly as they travelled)."""
    encoding = encoding.strip().lower()
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, EOFError, zlib.error):
        return body
    return body


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _prompt_text(doc: Any) -> str:
    if not isinstance(doc, dict):
        return ""
    if isinstance(doc.get("messages"), list):
        return " ".join(str(m.get("content", "")) for m in doc["messages"] if isinstance(m, dict))
    prompt = doc.get("prompt") or doc.get("input") or ""
    return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()


def parse_body(body: bytes, content_type: str, *, truncated: bool = False) -> Output:
    """Recognise an OpenAI-compatible answer (plain or SSE), else generic JSON, text or bytes."""
    if not body:
        return Output("empty")
    if "text/event-stream" in content_type or body.lstrip().startswith(b"data:"):
        return parse_sse(body)
    doc = _json(body)
    if doc is None:
        text = body.decode("utf-8", errors="replace")
        return Output("text", text=text)
    return parse_document(doc)


def parse_document(doc: Any) -> Output:
    """A JSON answer: chat/completion/embedding objects by their ``object`` field or shape, else generic."""
    if not isinstance(doc, dict):
        return Output("json", document=doc)
    obj = str(doc.get("object", ""))
    usage: dict[str, Any] = doc["usage"] if isinstance(doc.get("usage"), dict) else {}
    common: dict[str, Any] = {
        "document": doc,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "model": doc.get("model"),
    }
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        if isinstance(first.get("message"), dict) or obj == "chat.completion":
            message = first.get("message") or {}
            calls = tuple(_tool_call(c) for c in message.get("tool_calls") or [])
            return Output(
                "chat",
                text=message.get("content") or "",
                tool_calls=calls,
                finish_reason=first.get("finish_reason"),
                **common,
            )
        if "text" in first or obj == "text_completion":
            return Output(
                "completion", text=first.get("text") or "", finish_reason=first.get("finish_reason"), **common
            )
    data = doc.get("data")
    if obj == "list" and isinstance(data, list) and data and isinstance(data[0], dict) and "embedding" in data[0]:
        vectors = tuple(tuple(float(x) for x in item["embedding"]) for item in data if isinstance(item, dict))
        return Output("embedding", embeddings=vectors, **common)
    label = next((doc[k] for k in ("label", "prediction", "class") if isinstance(doc.get(k), str | int)), None)
    return Output("json", label=None if label is None else str(label), **common)


def _tool_call(call: Any) -> tuple[str, str]:
    function = call.get("function") or {} if isinstance(call, dict) else {}
    return str(function.get("name", "")), _canonical_arguments(function.get("arguments", ""))


def _canonical_arguments(arguments: Any) -> str:
    """Tool-call arguments compared as JSON values when they parse, else as text."""
    if isinstance(arguments, str):
        try:
            return orjson.dumps(orjson.loads(arguments), option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONDecodeError:
            return arguments.strip()
    return orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()


def parse_sse(body: bytes) -> Output:
    """Reassemble an OpenAI-style stream into its final text, tool calls, finish reason and usage.

    A stream that ends without ``[DONE]`` and without a finish reason stopped early: that is a
    ``truncated_stream`` error, never a clean success.
    """
    texts: list[str] = []
    calls: dict[int, list[str]] = {}
    finish = model = None
    usage: dict[str, Any] = {}
    done = False
    kind = "chat"
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            continue
        if data.strip() == b"[DONE]":
            done = True
            continue
        chunk = _json(data)
        if not isinstance(chunk, dict):
            continue
        model = chunk.get("model", model)
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                texts.append(delta.get("content") or "")
                for call in delta.get("tool_calls") or []:
                    parts = calls.setdefault(int(call.get("index", 0)), ["", ""])
                    function = call.get("function") or {}
                    parts[0] += function.get("name") or ""
                    parts[1] += function.get("arguments") or ""
            elif "text" in choice:
                kind = "completion"
                texts.append(choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
    tool_calls = tuple((name, _canonical_arguments(args)) for _, (name, args) in sorted(calls.items()))
    return Output(
        kind,
        text="".join(texts),
        tool_calls=tool_calls,
        finish_reason=finish,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        model=model,
        streamed=True,
        stream_error=None if done or finish else TRUNCATED_STREAM,
    )

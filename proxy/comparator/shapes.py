"""The shapes of LLM API answers, plain and streamed, read into a comparable ``Output``: which API an answer is.

Recognised without configuration, by their ``object``/``type`` fields or their structure: OpenAI chat
completions and completions (plain or chunk streams, tool calls, JSON mode), embeddings (``float`` or
``base64``) and Responses API objects and events; Anthropic Messages, their events and error bodies; the
native APIs of Hugging Face TGI (``/generate``, ``/generate_stream``) and Ollama (``/api/generate``,
``/api/chat``, plain or NDJSON). Any other document is generic JSON, and a stream of any other format is
read as text (shape ``sse`` or ``ndjson``) with no completeness rule: it is never a stream error.
``parse.py`` frames the bytes; this module tells the API of decoded JSON (``parse_document``, ``stream_output``)
and reads plain OpenAI and Anthropic documents. Streams are reassembled in ``streams.py``, TGI and Ollama
answers in ``native.py``; ``Output`` and the readers they share live in ``output.py`` and are re-exported here.

Invariant: the readers never raise on an odd document (they check each type instead of trusting the wire)
and never recurse in Python; an answer text's JSON is kept as a document only when it nests at most
``MAX_DEPTH`` levels (the comparator diffs documents recursively and ``orjson.dumps`` stops at 255), and
``parse.py`` holds whole bodies to the same bound.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from .native import OllamaStream, TgiStream, is_ollama, whole_answer
from .output import (
    ANTHROPIC,
    CHAT,
    COMPLETION,
    EMBEDDING,
    MAX_DEPTH,
    NDJSON,
    OLLAMA,
    RESPONSES,
    SSE,
    STREAM_ERROR,
    TGI,
    TRUNCATED_STREAM,
    Output,
    ToolCalls,
    anthropic_content,
    as_int,
    as_list,
    as_str,
    canonical_arguments,
    common_fields,
    json_content,
    opt_str,
    responses_finish,
    responses_output,
    text_of,
    too_deep,
    tool_call,
)
from .streams import AnthropicStream, ChatStream, ResponsesStream, Stream, UnknownStream

__all__ = [
    "ANTHROPIC",
    "CHAT",
    "COMPLETION",
    "EMBEDDING",
    "MAX_DEPTH",
    "NDJSON",
    "OLLAMA",
    "RESPONSES",
    "SSE",
    "STREAM_ERROR",
    "TGI",
    "TRUNCATED_STREAM",
    "Output",
    "ToolCalls",
    "canonical_arguments",
    "parse_document",
    "stream_output",
    "text_of",
    "too_deep",
]


def parse_document(doc: Any) -> Output:
    """A JSON answer, recognised by its ``object``/``type`` field or its structure, else generic JSON."""
    if not isinstance(doc, dict):
        first = doc[0] if isinstance(doc, list) and doc else None
        if isinstance(first, dict) and isinstance(first.get("generated_text"), str):  # TGI's "/" route, HF Inference
            return whole_answer(TgiStream, first)
        return Output("json", document=doc, shape="json")
    choices = doc.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        answer = _choice(doc, choices[0])
        if answer is not None:
            return answer
    if doc.get("object") == "response":
        return _responses(doc)
    kind = doc.get("type")
    if kind == "message" and isinstance(doc.get("content"), list):
        return _anthropic(doc)
    if kind == "error" and isinstance(doc.get("error"), dict):
        return Output("json", document=doc, shape=ANTHROPIC)
    data = doc.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and "embedding" in data[0]:
        return _embeddings(doc, data)
    if isinstance(doc.get("generated_text"), str):
        return whole_answer(TgiStream, doc)
    if is_ollama(doc):
        return whole_answer(OllamaStream, doc)
    label = next((doc[k] for k in ("label", "prediction", "class") if isinstance(doc.get(k), str | int)), None)
    return Output("json", document=doc, label=None if label is None else str(label), shape="json", **common_fields(doc))


def _choice(doc: dict[str, Any], first: dict[str, Any]) -> Output | None:
    common = common_fields(doc)
    finish = opt_str(first.get("finish_reason"))
    message = first.get("message")
    if isinstance(message, dict) or doc.get("object") == "chat.completion":
        message = message if isinstance(message, dict) else {}
        text = text_of(message.get("content"), "")
        calls = [tool_call(c) for c in as_list(message.get("tool_calls"))]
        if isinstance(message.get("function_call"), dict):  # the deprecated functions API
            calls.append(tool_call({"function": message["function_call"]}))
        return _answer("chat", CHAT, text, tuple(calls), finish, common)
    if "text" in first or doc.get("object") == "text_completion":
        return _answer("completion", COMPLETION, as_str(first.get("text")), (), finish, common)
    return None


def _answer(kind: str, shape: str, text: str, calls: ToolCalls, finish: str | None, common: dict[str, Any]) -> Output:
    """A text answer; its document is the JSON it holds, if any (JSON mode, structured outputs)."""
    return Output(
        kind, text=text, document=json_content(text), tool_calls=calls, finish_reason=finish, shape=shape, **common
    )


def _responses(doc: dict[str, Any]) -> Output:
    text, calls = responses_output(as_list(doc.get("output")))
    return _answer("chat", RESPONSES, text, calls, responses_finish(doc), common_fields(doc))


def _anthropic(doc: dict[str, Any]) -> Output:
    text, calls = anthropic_content(as_list(doc.get("content")))
    return _answer("chat", ANTHROPIC, text, calls, opt_str(doc.get("stop_reason")), common_fields(doc))


def _embeddings(doc: dict[str, Any], data: list[Any]) -> Output:
    items = sorted((item for item in data if isinstance(item, dict)), key=lambda item: as_int(item.get("index")) or 0)
    vectors: list[tuple[float, ...]] = []
    error = None
    for item in items:
        vector, bad = _vector(item.get("embedding"))
        vectors.append(vector)
        error = error or bad
    return Output("embedding", embeddings=tuple(vectors), shape=EMBEDDING, parse_error=error, **common_fields(doc))


def _vector(value: Any) -> tuple[tuple[float, ...], str | None]:
    """One embedding: a list of numbers, or (``encoding_format: base64``) little-endian float32 in base64."""
    if isinstance(value, str):
        try:
            return tuple(np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4").tolist()), None
        except (binascii.Error, ValueError):  # bad alphabet or padding, or a length not a multiple of 4
            return (), "bad_base64"
    if isinstance(value, list):
        try:
            return tuple(map(float, value)), None
        except (TypeError, ValueError, OverflowError):
            return (), "bad_embedding"
    return (), "bad_embedding"


def stream_output(
    events: list[tuple[str, dict[str, Any]]],
    *,
    truncated: bool,
    parse_error: str | None,
    framing: str = SSE,
    hint: str | None = None,
) -> Output:
    """Reassemble a stream's events (SSE ``event`` name, decoded ``data``; ``[DONE]`` as a name) into its answer.

    The API is told by the first event that says so, else by ``hint`` (the shape the bytes seem to have when
    no event could be read). A stream whose last event (``[DONE]`` or a finish reason,
    ``response.completed``/``.incomplete``/``.failed``, ``message_stop``, TGI's ``generated_text``, Ollama's
    ``done``) never came stopped early: ``truncated_stream``, unless the proxy's own body cap cut it
    (``truncated``). An error event, or a failed response, is ``stream_error``. A stream of no known API is
    shape ``framing`` (``sse`` or ``ndjson``), kind ``text``, with no error: its text is that of its events'
    text fields, or None when they have none (``parse.py`` then keeps their data).
    """
    family = _stream_family(events, framing) or _HINTS.get(hint or "")
    stream = family() if family is not None else UnknownStream(framing)
    for name, event in events:
        stream.feed(name, event)
    return stream.output(truncated=truncated, parse_error=parse_error)


_ANTHROPIC_EVENTS = frozenset(
    {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta"}
    | {"message_stop", "ping"}
)


def _stream_family(events: list[tuple[str, dict[str, Any]]], framing: str) -> type[Stream] | None:
    for name, event in events:
        family = _family(name, event)
        if family is not None:
            return family
    for _, event in events:  # nothing but error events
        family = _error_family(event, framing)
        if family is not None:
            return family
    return None


def _family(name: str, event: dict[str, Any]) -> type[Stream] | None:
    """The API an event belongs to, when it says so (``[DONE]`` alone does not: many servers send it)."""
    kind = event.get("type")
    kind = kind if isinstance(kind, str) else name
    if kind.startswith("response."):
        return ResponsesStream
    if kind in _ANTHROPIC_EVENTS:
        return AnthropicStream
    if "choices" in event:
        return ChatStream
    if isinstance(event.get("token"), dict) and "generated_text" in event:
        return TgiStream
    if is_ollama(event):
        return OllamaStream
    return None


def _error_family(event: dict[str, Any], framing: str) -> type[Stream] | None:
    error = event.get("error")
    if event.get("type") == "error":  # Anthropic's wrap an error object, the Responses API's do not
        return AnthropicStream if isinstance(error, dict) else ResponsesStream
    if isinstance(error, dict):  # an OpenAI-compatible server's error object
        return ChatStream
    if isinstance(error, str) and framing == NDJSON:  # Ollama's mid-stream error line
        return OllamaStream
    if isinstance(error, str) and "error_type" in event:  # TGI's ErrorResponse
        return TgiStream
    return None


_HINTS: dict[str, type[Stream]] = {
    CHAT: ChatStream,
    COMPLETION: ChatStream,
    RESPONSES: ResponsesStream,
    ANTHROPIC: AnthropicStream,
    TGI: TgiStream,
    OLLAMA: OllamaStream,
}

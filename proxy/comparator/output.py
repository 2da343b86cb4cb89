"""The comparable ``Output`` of one arm, the names of the shapes, and the field readers every shape shares.

``shapes.py`` reads plain documents and ``streams.py``/``native.py`` reassemble streams; all of them build an
``Output`` from the pieces here: usage blocks in OpenAI's convention, tool calls with canonical arguments, the
JSON an answer text holds, and the text and tool calls of Responses output items and Anthropic content blocks.

Invariant: nothing here raises on an odd value (each reader checks the type it gets instead of trusting the
wire) or recurses in Python; a JSON value is kept as a document only when it nests at most ``MAX_DEPTH``
levels (the comparator diffs documents recursively and ``orjson.dumps`` stops at 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

TRUNCATED_STREAM = "truncated_stream"  # the stream ended before its last event and the proxy did not cut it
STREAM_ERROR = "stream_error"  # the upstream sent an error event, or a failed response, inside a 200 stream
MAX_DEPTH = 128

CHAT, COMPLETION, EMBEDDING = "openai.chat", "openai.completion", "openai.embedding"
RESPONSES, ANTHROPIC = "openai.responses", "anthropic.messages"
TGI, OLLAMA = "tgi.generate", "ollama"
SSE, NDJSON = "sse", "ndjson"  # streams (SSE events, JSON lines) of a format not known here

ToolCalls = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Output:
    """What one arm answered, in comparable form.

    Token counts follow OpenAI's convention whatever the API: ``prompt_tokens`` is the whole prompt and
    includes ``cached_tokens``; ``completion_tokens`` includes ``reasoning_tokens``.
    """

    kind: str  # chat | completion | embedding | json | text | empty
    text: str | None = None
    document: Any = None  # a generic JSON answer, or an answer text that is a JSON object/array
    tool_calls: ToolCalls = ()  # (name, canonical JSON arguments)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    embeddings: tuple[tuple[float, ...], ...] = ()
    label: str | None = None
    model: str | None = None
    streamed: bool = False
    stream_error: str | None = None
    # openai.chat | openai.completion | openai.embedding | openai.responses | anthropic.messages | tgi.generate
    # | ollama | sse | ndjson (a stream of an unknown format) | json | text | empty
    shape: str = "unknown"
    truncated: bool = False  # the proxy's body cap cut the capture: not an error, the answer is partial
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    parse_error: str | None = None  # snake_case reason when part of a recognised answer could not be read


def common_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``Output`` fields every API's answer may carry at its top level: model and token counts."""
    return {"model": opt_str(doc.get("model")), **usage_fields(doc.get("usage"))}


def usage_fields(usage: Any) -> dict[str, Any]:
    """Token counts of an OpenAI (chat, completion, embedding, Responses) or Anthropic usage block, by field.

    Anthropic counts cache reads and writes apart from ``input_tokens``; they are added to ``prompt_tokens``
    so that every API reports the whole prompt, as OpenAI does.
    """
    if not isinstance(usage, dict):
        return {}
    inputs = as_dict(usage.get("prompt_tokens_details") or usage.get("input_tokens_details"))
    outputs = as_dict(usage.get("completion_tokens_details") or usage.get("output_tokens_details"))
    cache_read = as_int(usage.get("cache_read_input_tokens"))
    prompt = as_int(usage.get("prompt_tokens"))
    if prompt is None and (given := as_int(usage.get("input_tokens"))) is not None:
        prompt = given + (cache_read or 0) + (as_int(usage.get("cache_creation_input_tokens")) or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": as_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        "reasoning_tokens": as_int(outputs.get("reasoning_tokens", outputs.get("thinking_tokens"))),
        "cached_tokens": as_int(inputs.get("cached_tokens")) if cache_read is None else cache_read,
    }


def responses_output(items: list[Any]) -> tuple[str, ToolCalls]:
    """Text of the ``output_text`` parts of message items and the function calls of a Responses ``output``.

    Reasoning items and built-in tool calls (web search, file search...) are not part of the answer.
    """
    texts: list[str] = []
    calls: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            parts = (p for p in as_list(item.get("content")) if isinstance(p, dict))
            texts.extend(as_str(p.get("text")) for p in parts if p.get("type") == "output_text")
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item.get("arguments", item.get("input", ""))
            calls.append((as_str(item.get("name")), canonical_arguments(arguments)))
    return "".join(texts), tuple(calls)


def responses_finish(response: dict[str, Any]) -> str | None:
    """A Responses status as a finish reason: why it is incomplete (``max_output_tokens``...) when it is."""
    status = opt_str(response.get("status"))
    reason = as_dict(response.get("incomplete_details")).get("reason")
    return reason if status == "incomplete" and isinstance(reason, str) else status


def anthropic_content(blocks: list[Any]) -> tuple[str, ToolCalls]:
    """Text of the ``text`` blocks and the ``tool_use`` calls of an Anthropic message (thinking is skipped)."""
    texts: list[str] = []
    calls: list[tuple[str, str]] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(as_str(block.get("text")))
        elif block.get("type") == "tool_use":
            calls.append((as_str(block.get("name")), canonical_arguments(block.get("input", {}))))
    return "".join(texts), tuple(calls)


def tool_call(call: Any) -> tuple[str, str]:
    """A chat tool call (``function`` or ``custom``) as (name, canonical arguments)."""
    call = as_dict(call)
    function = as_dict(call.get("function") or call.get("custom"))
    return as_str(function.get("name")), canonical_arguments(function.get("arguments", function.get("input", "")))


def canonical_arguments(arguments: Any) -> str:
    """Tool-call arguments compared as JSON values when they parse, else as text."""
    value = arguments
    if isinstance(arguments, str):
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments.strip()
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return arguments.strip() if isinstance(arguments, str) else ""


def json_content(text: str) -> Any:
    """The value of an answer text that is a JSON object or array (JSON mode, structured outputs), else None."""
    if not text or text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return None if too_deep(value, text.count("{") + text.count("[")) else value


def too_deep(doc: Any, brackets: int) -> bool:
    """Whether ``doc`` nests deeper than MAX_DEPTH; ``brackets`` (the ``{`` and ``[`` in its text) bounds the
    depth, so the walk only happens for documents with many containers."""
    if brackets <= MAX_DEPTH:
        return False
    stack = [(doc, 1)] if isinstance(doc, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def text_of(content: Any, separator: str = " ") -> str:
    """A content value as text: a string, or the ``text`` of a list of parts/blocks (any API's text types)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return separator.join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def as_str(value: Any) -> str:
    """``value`` when it is a string, else ""."""
    return value if isinstance(value, str) else ""


def opt_str(value: Any) -> str | None:
    """``value`` when it is a string, else None."""
    return value if isinstance(value, str) else None


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (not a bool) or a float with no fraction, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() else None


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` when it is a dict, else an empty one."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` when it is a list, else an empty one."""
    return value if isinstance(value, list) else []

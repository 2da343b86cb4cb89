"""The shapes of LLM API answers, plain and streamed, read into a comparable ``Output``.

Recognised without configuration, by their ``object``/``type`` fields or their structure: OpenAI chat
completions and completions (plain or chunk streams, tool calls, JSON mode), embeddings (``float`` or
``base64``) and Responses API objects and events; Anthropic Messages, their events and error bodies; the
native APIs of Hugging Face TGI (``/generate``, ``/generate_stream``) and Ollama (``/api/generate``,
``/api/chat``, plain or NDJSON). Any other document is generic JSON, and a stream of any other format is
read as text (shape ``sse`` or ``ndjson``) with no completeness rule: it is never a stream error.
``parse.py`` frames the bytes; this module reads decoded JSON.

Invariant: the readers never raise on an odd document (they check each type instead of trusting the wire)
and never recurse in Python; an answer text's JSON is kept as a document only when it nests at most
``MAX_DEPTH`` levels (the comparator diffs documents recursively and ``orjson.dumps`` stops at 255), and
``parse.py`` holds whole bodies to the same bound.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
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


def parse_document(doc: Any) -> Output:
    """A JSON answer, recognised by its ``object``/``type`` field or its structure, else generic JSON."""
    if not isinstance(doc, dict):
        first = doc[0] if isinstance(doc, list) and doc else None
        if isinstance(first, dict) and isinstance(first.get("generated_text"), str):  # TGI's "/" route, HF Inference
            return _whole(_TgiStream, first)
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
        return _whole(_TgiStream, doc)
    if _is_ollama(doc):
        return _whole(_OllamaStream, doc)
    label = next((doc[k] for k in ("label", "prediction", "class") if isinstance(doc.get(k), str | int)), None)
    return Output("json", document=doc, label=None if label is None else str(label), shape="json", **_common(doc))


def _choice(doc: dict[str, Any], first: dict[str, Any]) -> Output | None:
    common = _common(doc)
    finish = _opt_str(first.get("finish_reason"))
    message = first.get("message")
    if isinstance(message, dict) or doc.get("object") == "chat.completion":
        message = message if isinstance(message, dict) else {}
        text = text_of(message.get("content"), "")
        calls = [_tool_call(c) for c in _list(message.get("tool_calls"))]
        if isinstance(message.get("function_call"), dict):  # the deprecated functions API
            calls.append(_tool_call({"function": message["function_call"]}))
        return _answer("chat", CHAT, text, tuple(calls), finish, common)
    if "text" in first or doc.get("object") == "text_completion":
        return _answer("completion", COMPLETION, _str(first.get("text")), (), finish, common)
    return None


def _answer(kind: str, shape: str, text: str, calls: ToolCalls, finish: str | None, common: dict[str, Any]) -> Output:
    """A text answer; its document is the JSON it holds, if any (JSON mode, structured outputs)."""
    return Output(
        kind, text=text, document=_json_content(text), tool_calls=calls, finish_reason=finish, shape=shape, **common
    )


def _responses(doc: dict[str, Any]) -> Output:
    text, calls = _responses_output(_list(doc.get("output")))
    return _answer("chat", RESPONSES, text, calls, _responses_finish(doc), _common(doc))


def _responses_output(items: list[Any]) -> tuple[str, ToolCalls]:
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
            parts = (p for p in _list(item.get("content")) if isinstance(p, dict))
            texts.extend(_str(p.get("text")) for p in parts if p.get("type") == "output_text")
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item.get("arguments", item.get("input", ""))
            calls.append((_str(item.get("name")), canonical_arguments(arguments)))
    return "".join(texts), tuple(calls)


def _responses_finish(response: dict[str, Any]) -> str | None:
    """A Responses status as a finish reason: why it is incomplete (``max_output_tokens``...) when it is."""
    status = _opt_str(response.get("status"))
    reason = _dict(response.get("incomplete_details")).get("reason")
    return reason if status == "incomplete" and isinstance(reason, str) else status


def _anthropic(doc: dict[str, Any]) -> Output:
    text, calls = _anthropic_content(_list(doc.get("content")))
    return _answer("chat", ANTHROPIC, text, calls, _opt_str(doc.get("stop_reason")), _common(doc))


def _anthropic_content(blocks: list[Any]) -> tuple[str, ToolCalls]:
    """Text of the ``text`` blocks and the ``tool_use`` calls of an Anthropic message (thinking is skipped)."""
    texts: list[str] = []
    calls: list[tuple[str, str]] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(_str(block.get("text")))
        elif block.get("type") == "tool_use":
            calls.append((_str(block.get("name")), canonical_arguments(block.get("input", {}))))
    return "".join(texts), tuple(calls)


def _embeddings(doc: dict[str, Any], data: list[Any]) -> Output:
    items = sorted((item for item in data if isinstance(item, dict)), key=lambda item: _int(item.get("index")) or 0)
    vectors: list[tuple[float, ...]] = []
    error = None
    for item in items:
        vector, bad = _vector(item.get("embedding"))
        vectors.append(vector)
        error = error or bad
    return Output("embedding", embeddings=tuple(vectors), shape=EMBEDDING, parse_error=error, **_common(doc))


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
    stream = family() if family is not None else _UnknownStream(framing)
    for name, event in events:
        stream.feed(name, event)
    return stream.output(truncated=truncated, parse_error=parse_error)


_ANTHROPIC_EVENTS = frozenset(
    {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta"}
    | {"message_stop", "ping"}
)


def _stream_family(events: list[tuple[str, dict[str, Any]]], framing: str) -> type[_Stream] | None:
    for name, event in events:
        family = _family(name, event)
        if family is not None:
            return family
    for _, event in events:  # nothing but error events
        family = _error_family(event, framing)
        if family is not None:
            return family
    return None


def _family(name: str, event: dict[str, Any]) -> type[_Stream] | None:
    """The API an event belongs to, when it says so (``[DONE]`` alone does not: many servers send it)."""
    kind = event.get("type")
    kind = kind if isinstance(kind, str) else name
    if kind.startswith("response."):
        return _ResponsesStream
    if kind in _ANTHROPIC_EVENTS:
        return _AnthropicStream
    if "choices" in event:
        return _ChatStream
    if isinstance(event.get("token"), dict) and "generated_text" in event:
        return _TgiStream
    if _is_ollama(event):
        return _OllamaStream
    return None


def _error_family(event: dict[str, Any], framing: str) -> type[_Stream] | None:
    error = event.get("error")
    if event.get("type") == "error":  # Anthropic's wrap an error object, the Responses API's do not
        return _AnthropicStream if isinstance(error, dict) else _ResponsesStream
    if isinstance(error, dict):  # an OpenAI-compatible server's error object
        return _ChatStream
    if isinstance(error, str) and framing == NDJSON:  # Ollama's mid-stream error line
        return _OllamaStream
    if isinstance(error, str) and "error_type" in event:  # TGI's ErrorResponse
        return _TgiStream
    return None


def _is_ollama(doc: dict[str, Any]) -> bool:
    return isinstance(doc.get("done"), bool) and (
        isinstance(doc.get("response"), str) or isinstance(doc.get("message"), dict)
    )


def _whole(family: type[_Stream], doc: dict[str, Any]) -> Output:
    """A non-streamed answer of an API whose plain answer has the fields of its last stream event (TGI, Ollama)."""
    stream = family()
    stream.feed("", doc)
    return stream.output(truncated=False, parse_error=None, streamed=False)


class _Stream:
    """What every stream being reassembled keeps; a subclass reads one API's events."""

    kind, shape = "chat", CHAT

    def __init__(self) -> None:
        self.model: str | None = None
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        self.complete = False  # its last event came
        self.failed = False  # an error event, or a failed response

    def feed(self, name: str, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def answer(self) -> tuple[str, ToolCalls]:
        raise NotImplementedError

    def output(self, *, truncated: bool, parse_error: str | None, streamed: bool = True) -> Output:
        text, calls = self.answer()
        unfinished = streamed and not (self.complete or truncated)  # a plain answer has no last event to miss
        error = STREAM_ERROR if self.failed else TRUNCATED_STREAM if unfinished else None
        return Output(
            self.kind,
            text=text,
            document=_json_content(text),
            tool_calls=calls,
            finish_reason=self.finish,
            model=self.model,
            streamed=streamed,
            stream_error=error,
            shape=self.shape,
            truncated=truncated,
            parse_error=parse_error,
            **_usage_fields(self.usage),
        )


class _ChatStream(_Stream):
    """OpenAI chat completion (or legacy completion) chunks: the deltas of the first choice, then usage."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.calls: dict[int, tuple[list[str], list[str]]] = {}  # tool call index -> name parts, argument parts

    def feed(self, name: str, event: dict[str, Any]) -> None:
        if name == "[DONE]":
            self.complete = True
            return
        if "error" in event:  # inside a 200 stream: an error object (OpenAI, vLLM), or TGI's {"error", "error_type"}
            self.failed = self.failed or isinstance(event["error"], dict | str)
        self.model = _opt_str(event.get("model")) or self.model
        if isinstance(event.get("usage"), dict):  # stream_options.include_usage: a last chunk with no choices
            self.usage = event["usage"]
        for choice in _list(event.get("choices")):
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self.texts.append(_str(delta.get("content")))
            for call in _list(delta.get("tool_calls")):
                self._call(_dict(call))
            if isinstance(delta.get("function_call"), dict):  # the deprecated functions API
                self._call({"function": delta["function_call"]})
        elif "text" in choice:
            self.kind, self.shape = "completion", COMPLETION
            self.texts.append(_str(choice.get("text")))
        if isinstance(choice.get("finish_reason"), str):
            self.finish, self.complete = choice["finish_reason"], True

    def _call(self, call: dict[str, Any]) -> None:
        # Like openai-python's accumulator: fragments of the name and of the arguments are concatenated.
        names, arguments = self.calls.setdefault(_int(call.get("index")) or 0, ([], []))
        function = _dict(call.get("function"))
        names.append(_str(function.get("name")))
        arguments.append(_str(function.get("arguments")))

    def answer(self) -> tuple[str, ToolCalls]:
        calls = tuple(("".join(n), canonical_arguments("".join(a))) for _, (n, a) in sorted(self.calls.items()))
        return "".join(self.texts), calls


class _ResponsesStream(_Stream):
    """Responses API events: output items by index, text and argument deltas, then the final response."""

    shape = RESPONSES

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[int, dict[str, Any]] = {}  # output index -> item, as added or done
        self.done: set[int] = set()
        self.texts: dict[int, list[str]] = {}
        self.arguments: dict[int, list[str]] = {}
        self.final: list[Any] = []  # the output of the response that ended the stream

    def feed(self, name: str, event: dict[str, Any]) -> None:
        kind, index = event.get("type", name), _int(event.get("output_index")) or 0
        if kind == "response.output_text.delta":
            self.texts.setdefault(index, []).append(_str(event.get("delta")))
        elif kind == "response.function_call_arguments.delta":
            self.arguments.setdefault(index, []).append(_str(event.get("delta")))
        elif kind == "response.function_call_arguments.done":
            self.arguments[index] = [_str(event.get("arguments"))]
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self.items[index] = _dict(event.get("item"))
            if kind == "response.output_item.done":
                self.done.add(index)
        elif isinstance(event.get("response"), dict):
            self._response(kind, event["response"])
        elif kind == "error":
            self.failed = self.complete = True

    def _response(self, kind: Any, response: dict[str, Any]) -> None:
        self.model = _opt_str(response.get("model")) or self.model
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.complete, self.failed = True, kind == "response.failed"
            self.finish = _responses_finish(response)
            self.usage = _dict(response.get("usage"))
            self.final = _list(response.get("output"))

    def answer(self) -> tuple[str, ToolCalls]:
        if self.final:
            return _responses_output(self.final)
        indices = sorted(self.items.keys() | self.texts.keys() | self.arguments.keys())
        return _responses_output([self._item(index) for index in indices])

    def _item(self, index: int) -> dict[str, Any]:
        """An output item as ``output_item.done`` gave it, else rebuilt from its deltas so far."""
        item = self.items.get(index, {})
        if index in self.done or item.get("type") not in (None, "message", "function_call"):
            return item
        if index in self.arguments or item.get("type") == "function_call":
            return {**item, "type": "function_call", "arguments": "".join(self.arguments.get(index, []))}
        return {"type": "message", "content": [{"type": "output_text", "text": "".join(self.texts.get(index, []))}]}


class _AnthropicStream(_Stream):
    """Anthropic Messages events: content blocks by index and their deltas, usage from start and delta."""

    shape = ANTHROPIC

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[int, dict[str, Any]] = {}
        self.deltas: dict[int, list[str]] = {}  # block index -> text or partial JSON fragments

    def feed(self, name: str, event: dict[str, Any]) -> None:
        kind, index = event.get("type", name), _int(event.get("index")) or 0
        if kind == "content_block_delta":
            delta = _dict(event.get("delta"))
            # thinking, signature and citations deltas are not part of the answer
            if delta.get("type") in ("text_delta", "input_json_delta"):
                self.deltas.setdefault(index, []).append(_str(delta.get("text", delta.get("partial_json"))))
        elif kind == "content_block_start":
            self.blocks[index] = _dict(event.get("content_block"))
        elif kind == "message_start":
            message = _dict(event.get("message"))
            self.model = _opt_str(message.get("model"))
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            self.finish = _opt_str(_dict(event.get("delta")).get("stop_reason")) or self.finish
            self._usage(event.get("usage"))
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.failed = self.complete = True

    def _usage(self, usage: Any) -> None:
        # message_delta counts are cumulative: they replace those of message_start
        self.usage.update((key, value) for key, value in _dict(usage).items() if value is not None)

    def answer(self) -> tuple[str, ToolCalls]:
        blocks = []
        for index in sorted(self.blocks.keys() | self.deltas.keys()):
            block = dict(self.blocks.get(index) or {"type": "text"})
            joined = "".join(self.deltas.get(index, []))
            if block.get("type") == "text":
                block["text"] = _str(block.get("text")) + joined
            elif block.get("type") == "tool_use" and joined.strip():
                block["input"] = joined  # the input object arrives as partial JSON text
            blocks.append(block)
        return _anthropic_content(blocks)


class _TgiStream(_Stream):
    """TGI's native ``/generate_stream`` events: one token each; the last carries the whole text and details.

    A plain ``/generate`` answer has the fields of that last event. ``details`` comes only when asked for.
    """

    kind, shape = "completion", TGI

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []
        self.text: str | None = None

    def feed(self, name: str, event: dict[str, Any]) -> None:
        if isinstance(event.get("error"), str):  # TGI's ErrorResponse, sent as an event when generation fails
            self.failed = self.complete = True
            return
        token = _dict(event.get("token"))
        if token.get("special") is not True:  # the text TGI returns skips special tokens (</s>, <|eot_id|>...)
            self.tokens.append(_str(token.get("text")))
        if isinstance(event.get("generated_text"), str):
            self.text, self.complete = event["generated_text"], True
        details = _dict(event.get("details"))
        if details:
            self.finish = _opt_str(details.get("finish_reason"))
            # input_length (streams, TGI 2+); prefill lists the prompt's tokens only with decoder_input_details
            prompt = details.get("input_length", len(_list(details.get("prefill"))) or None)
            self.usage = {"prompt_tokens": prompt, "completion_tokens": details.get("generated_tokens")}

    def answer(self) -> tuple[str, ToolCalls]:
        return "".join(self.tokens) if self.text is None else self.text, ()


class _OllamaStream(_Stream):
    """Ollama's native ``/api/generate`` and ``/api/chat`` lines: a piece of text each, then one with ``done``.

    A plain answer is that last line with the whole text. Thinking is not part of the answer.
    """

    kind, shape = "completion", OLLAMA

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.calls: list[tuple[str, str]] = []

    def feed(self, name: str, event: dict[str, Any]) -> None:
        if isinstance(event.get("error"), str | dict):  # an error mid-stream is a line of its own
            self.failed = self.complete = True
            return
        self.model = _opt_str(event.get("model")) or self.model
        message = event.get("message")
        if isinstance(message, dict):
            self.kind = "chat"
            self.texts.append(_str(message.get("content")))
            self.calls.extend(_tool_call(call) for call in _list(message.get("tool_calls")))
        else:
            self.texts.append(_str(event.get("response")))
        if event.get("done") is True:
            self.complete, self.finish = True, _opt_str(event.get("done_reason"))
            self.usage = {"prompt_tokens": event.get("prompt_eval_count"), "completion_tokens": event.get("eval_count")}

    def answer(self) -> tuple[str, ToolCalls]:
        return "".join(self.texts), tuple(self.calls)


class _UnknownStream(_Stream):
    """A stream of a format not known here: the text of its events, and never a stream error (no rule says when
    such a stream is complete). Unreadable events are a parse error only when others were read (JSON objects or
    ``[DONE]``): a stream none of whose events is JSON is a text stream."""

    kind = "text"

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.shape = shape
        self.texts: list[str] = []
        self.read = False

    def feed(self, name: str, event: dict[str, Any]) -> None:
        self.read = True
        self.model = _opt_str(event.get("model")) or self.model
        text = _loose_text(event)
        if text is not None:
            self.texts.append(text)

    def answer(self) -> tuple[str, ToolCalls]:
        return "".join(self.texts), ()

    def output(self, *, truncated: bool, parse_error: str | None, streamed: bool = True) -> Output:
        text = "".join(self.texts) if self.texts else None
        document = _json_content(text) if text else None
        error = parse_error if self.read else None
        return Output(
            "text",
            text=text,
            document=document,
            model=self.model,
            streamed=True,
            shape=self.shape,
            truncated=truncated,
            parse_error=error,
        )


_TEXT_FIELDS = ("delta", "text", "content", "token", "response", "message")


def _loose_text(event: dict[str, Any]) -> str | None:
    """The text an event of an unknown stream carries, under a name streaming APIs commonly give it (a string,
    or an object's ``text``/``content``: llama.cpp's ``content``, a ``token.text``, a ``delta``...)."""
    for key in _TEXT_FIELDS:
        value = event.get(key)
        if isinstance(value, dict):
            value = value.get("text", value.get("content"))
        if isinstance(value, str):
            return value
    return None


_HINTS: dict[str, type[_Stream]] = {
    CHAT: _ChatStream,
    COMPLETION: _ChatStream,
    RESPONSES: _ResponsesStream,
    ANTHROPIC: _AnthropicStream,
    TGI: _TgiStream,
    OLLAMA: _OllamaStream,
}


def _common(doc: dict[str, Any]) -> dict[str, Any]:
    return {"model": _opt_str(doc.get("model")), **_usage_fields(doc.get("usage"))}


def _usage_fields(usage: Any) -> dict[str, Any]:
    """Token counts of an OpenAI (chat, completion, embedding, Responses) or Anthropic usage block, by field.

    Anthropic counts cache reads and writes apart from ``input_tokens``; they are added to ``prompt_tokens``
    so that every API reports the whole prompt, as OpenAI does.
    """
    if not isinstance(usage, dict):
        return {}
    inputs = _dict(usage.get("prompt_tokens_details") or usage.get("input_tokens_details"))
    outputs = _dict(usage.get("completion_tokens_details") or usage.get("output_tokens_details"))
    cache_read = _int(usage.get("cache_read_input_tokens"))
    prompt = _int(usage.get("prompt_tokens"))
    if prompt is None and (given := _int(usage.get("input_tokens"))) is not None:
        prompt = given + (cache_read or 0) + (_int(usage.get("cache_creation_input_tokens")) or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": _int(usage.get("completion_tokens", usage.get("output_tokens"))),
        "reasoning_tokens": _int(outputs.get("reasoning_tokens", outputs.get("thinking_tokens"))),
        "cached_tokens": _int(inputs.get("cached_tokens")) if cache_read is None else cache_read,
    }


def _tool_call(call: Any) -> tuple[str, str]:
    """A chat tool call (``function`` or ``custom``) as (name, canonical arguments)."""
    call = _dict(call)
    function = _dict(call.get("function") or call.get("custom"))
    return _str(function.get("name")), canonical_arguments(function.get("arguments", function.get("input", "")))


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


def _json_content(text: str) -> Any:
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


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []

"""Reassembling the event streams of OpenAI (chat completions, completions, Responses) and Anthropic Messages,
and of formats not known here, into an ``Output``.

A ``Stream`` is fed a stream's events in order (SSE ``event`` name, decoded ``data``; ``[DONE]`` as a name),
then gives the answer they add up to. ``shapes.stream_output`` tells which reader a stream needs; TGI's and
Ollama's native streams are read in ``native.py``.

Invariant: a reader never raises on an odd event (it checks each type instead of trusting the wire); a stream
whose last event never came is ``truncated_stream`` unless the proxy's body cap cut it, an error event or a
failed response is ``stream_error``, and a stream of an unknown format is never an error.
"""

from __future__ import annotations

from typing import Any

from .output import (
    ANTHROPIC,
    CHAT,
    COMPLETION,
    RESPONSES,
    STREAM_ERROR,
    TRUNCATED_STREAM,
    Output,
    ToolCalls,
    anthropic_content,
    as_dict,
    as_int,
    as_list,
    as_str,
    canonical_arguments,
    json_content,
    opt_str,
    responses_finish,
    responses_output,
    usage_fields,
)


class Stream:
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
            document=json_content(text),
            tool_calls=calls,
            finish_reason=self.finish,
            model=self.model,
            streamed=streamed,
            stream_error=error,
            shape=self.shape,
            truncated=truncated,
            parse_error=parse_error,
            **usage_fields(self.usage),
        )


class ChatStream(Stream):
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
        self.model = opt_str(event.get("model")) or self.model
        if isinstance(event.get("usage"), dict):  # stream_options.include_usage: a last chunk with no choices
            self.usage = event["usage"]
        for choice in as_list(event.get("choices")):
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self.texts.append(as_str(delta.get("content")))
            for call in as_list(delta.get("tool_calls")):
                self._call(as_dict(call))
            if isinstance(delta.get("function_call"), dict):  # the deprecated functions API
                self._call({"function": delta["function_call"]})
        elif "text" in choice:
            self.kind, self.shape = "completion", COMPLETION
            self.texts.append(as_str(choice.get("text")))
        if isinstance(choice.get("finish_reason"), str):
            self.finish, self.complete = choice["finish_reason"], True

    def _call(self, call: dict[str, Any]) -> None:
        # Like openai-python's accumulator: fragments of the name and of the arguments are concatenated.
        names, arguments = self.calls.setdefault(as_int(call.get("index")) or 0, ([], []))
        function = as_dict(call.get("function"))
        names.append(as_str(function.get("name")))
        arguments.append(as_str(function.get("arguments")))

    def answer(self) -> tuple[str, ToolCalls]:
        calls = tuple(("".join(n), canonical_arguments("".join(a))) for _, (n, a) in sorted(self.calls.items()))
        return "".join(self.texts), calls


class ResponsesStream(Stream):
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
        kind, index = event.get("type", name), as_int(event.get("output_index")) or 0
        if kind == "response.output_text.delta":
            self.texts.setdefault(index, []).append(as_str(event.get("delta")))
        elif kind == "response.function_call_arguments.delta":
            self.arguments.setdefault(index, []).append(as_str(event.get("delta")))
        elif kind == "response.function_call_arguments.done":
            self.arguments[index] = [as_str(event.get("arguments"))]
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self.items[index] = as_dict(event.get("item"))
            if kind == "response.output_item.done":
                self.done.add(index)
        elif isinstance(event.get("response"), dict):
            self._response(kind, event["response"])
        elif kind == "error":
            self.failed = self.complete = True

    def _response(self, kind: Any, response: dict[str, Any]) -> None:
        self.model = opt_str(response.get("model")) or self.model
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.complete, self.failed = True, kind == "response.failed"
            self.finish = responses_finish(response)
            self.usage = as_dict(response.get("usage"))
            self.final = as_list(response.get("output"))

    def answer(self) -> tuple[str, ToolCalls]:
        if self.final:
            return responses_output(self.final)
        indices = sorted(self.items.keys() | self.texts.keys() | self.arguments.keys())
        return responses_output([self._item(index) for index in indices])

    def _item(self, index: int) -> dict[str, Any]:
        """An output item as ``output_item.done`` gave it, else rebuilt from its deltas so far."""
        item = self.items.get(index, {})
        if index in self.done or item.get("type") not in (None, "message", "function_call"):
            return item
        if index in self.arguments or item.get("type") == "function_call":
            return {**item, "type": "function_call", "arguments": "".join(self.arguments.get(index, []))}
        return {"type": "message", "content": [{"type": "output_text", "text": "".join(self.texts.get(index, []))}]}


class AnthropicStream(Stream):
    """Anthropic Messages events: content blocks by index and their deltas, usage from start and delta."""

    shape = ANTHROPIC

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[int, dict[str, Any]] = {}
        self.deltas: dict[int, list[str]] = {}  # block index -> text or partial JSON fragments

    def feed(self, name: str, event: dict[str, Any]) -> None:
        kind, index = event.get("type", name), as_int(event.get("index")) or 0
        if kind == "content_block_delta":
            delta = as_dict(event.get("delta"))
            # thinking, signature and citations deltas are not part of the answer
            if delta.get("type") in ("text_delta", "input_json_delta"):
                self.deltas.setdefault(index, []).append(as_str(delta.get("text", delta.get("partial_json"))))
        elif kind == "content_block_start":
            self.blocks[index] = as_dict(event.get("content_block"))
        elif kind == "message_start":
            message = as_dict(event.get("message"))
            self.model = opt_str(message.get("model"))
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            self.finish = opt_str(as_dict(event.get("delta")).get("stop_reason")) or self.finish
            self._usage(event.get("usage"))
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.failed = self.complete = True

    def _usage(self, usage: Any) -> None:
        # message_delta counts are cumulative: they replace those of message_start
        self.usage.update((key, value) for key, value in as_dict(usage).items() if value is not None)

    def answer(self) -> tuple[str, ToolCalls]:
        blocks = []
        for index in sorted(self.blocks.keys() | self.deltas.keys()):
            block = dict(self.blocks.get(index) or {"type": "text"})
            joined = "".join(self.deltas.get(index, []))
            if block.get("type") == "text":
                block["text"] = as_str(block.get("text")) + joined
            elif block.get("type") == "tool_use" and joined.strip():
                block["input"] = joined  # the input object arrives as partial JSON text
            blocks.append(block)
        return anthropic_content(blocks)


class UnknownStream(Stream):
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
        self.model = opt_str(event.get("model")) or self.model
        text = _loose_text(event)
        if text is not None:
            self.texts.append(text)

    def answer(self) -> tuple[str, ToolCalls]:
        return "".join(self.texts), ()

    def output(self, *, truncated: bool, parse_error: str | None, streamed: bool = True) -> Output:
        text = "".join(self.texts) if self.texts else None
        document = json_content(text) if text else None
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

"""The native APIs of Hugging Face TGI (``/generate``, ``/generate_stream``) and Ollama (``/api/generate``,
``/api/chat``), whose plain answer has the fields of the last event of their stream.

Both are read by a ``Stream`` subclass: a stream event by event, a plain answer as that one last event
(``whole_answer``). ``shapes.py`` recognises them; ``is_ollama`` is how it tells an Ollama line or answer.

Invariant: as in ``streams.py``, nothing here raises on an odd event; an error event (TGI's ErrorResponse,
Ollama's error line) is ``stream_error``, a stream without its last event ``truncated_stream``.
"""

from __future__ import annotations

from typing import Any

from .output import OLLAMA, TGI, Output, ToolCalls, as_dict, as_list, as_str, opt_str, tool_call
from .streams import Stream


def is_ollama(doc: dict[str, Any]) -> bool:
    """Whether a JSON object is an Ollama answer or stream line (a ``done`` flag, a ``response`` or ``message``)."""
    return isinstance(doc.get("done"), bool) and (
        isinstance(doc.get("response"), str) or isinstance(doc.get("message"), dict)
    )


def whole_answer(family: type[Stream], doc: dict[str, Any]) -> Output:
    """A non-streamed answer of an API whose plain answer has the fields of its last stream event (TGI, Ollama)."""
    stream = family()
    stream.feed("", doc)
    return stream.output(truncated=False, parse_error=None, streamed=False)


class TgiStream(Stream):
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
        token = as_dict(event.get("token"))
        if token.get("special") is not True:  # the text TGI returns skips special tokens (</s>, <|eot_id|>...)
            self.tokens.append(as_str(token.get("text")))
        if isinstance(event.get("generated_text"), str):
            self.text, self.complete = event["generated_text"], True
        details = as_dict(event.get("details"))
        if details:
            self.finish = opt_str(details.get("finish_reason"))
            # input_length (streams, TGI 2+); prefill lists the prompt's tokens only with decoder_input_details
            prompt = details.get("input_length", len(as_list(details.get("prefill"))) or None)
            self.usage = {"prompt_tokens": prompt, "completion_tokens": details.get("generated_tokens")}

    def answer(self) -> tuple[str, ToolCalls]:
        return "".join(self.tokens) if self.text is None else self.text, ()


class OllamaStream(Stream):
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
        self.model = opt_str(event.get("model")) or self.model
        message = event.get("message")
        if isinstance(message, dict):
            self.kind = "chat"
            self.texts.append(as_str(message.get("content")))
            self.calls.extend(tool_call(call) for call in as_list(message.get("tool_calls")))
        else:
            self.texts.append(as_str(event.get("response")))
        if event.get("done") is True:
            self.complete, self.finish = True, opt_str(event.get("done_reason"))
            self.usage = {"prompt_tokens": event.get("prompt_eval_count"), "completion_tokens": event.get("eval_count")}

    def answer(self) -> tuple[str, ToolCalls]:
        return "".join(self.texts), tuple(self.calls)

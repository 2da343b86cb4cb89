"""Parsing recorded answers: OpenAI JSON and SSE streams, embeddings, generic JSON, text, encodings."""

from __future__ import annotations

import gzip
from collections.abc import Mapping

import orjson
import pytest

from proxy.comparator.parse import PoisonRecord, parse_body, parse_record, parse_sse


def _sse(*events: object, done: bool = True) -> bytes:
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def _delta(content: str | None = None, finish: str | None = None, **extra: object) -> dict[str, object]:
    delta: dict[str, object] = {"content": content} if content is not None else {}
    delta.update(extra)
    return {
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_chat_stream_is_reassembled() -> None:
    """Deltas join into the final text; finish reason and usage are kept; [DONE] makes it clean."""
    usage = {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    out = parse_sse(_sse(_delta(role="assistant"), _delta("Hel"), _delta("lo"), _delta(finish="stop"), usage))
    assert (out.kind, out.text, out.finish_reason) == ("chat", "Hello", "stop")
    assert (out.prompt_tokens, out.completion_tokens, out.stream_error) == (4, 2, None)


def test_stream_cut_before_the_end_is_truncated() -> None:
    """No [DONE] and no finish reason: truncated_stream, never a clean success."""
    out = parse_sse(_sse(_delta("Hel"), _delta("lo"), done=False))
    assert out.text == "Hello" and out.stream_error == "truncated_stream"


def test_streamed_tool_calls_are_assembled_by_index() -> None:
    """Tool-call name and argument fragments are joined per index; arguments compared as JSON."""
    call = lambda **f: {"index": 0, "function": f}  # noqa: E731
    out = parse_sse(
        _sse(
            _delta(tool_calls=[call(name="get_weather", arguments='{"city": ')]),
            _delta(tool_calls=[call(arguments='"Paris"}')]),
            _delta(finish="tool_calls"),
        )
    )
    assert out.tool_calls == (("get_weather", '{"city":"Paris"}'),)


def test_completion_stream_and_json() -> None:
    """Legacy completions are recognised in both forms."""
    chunk = {"object": "text_completion", "choices": [{"index": 0, "text": "abc", "finish_reason": "stop"}]}
    assert parse_sse(_sse(chunk)).kind == "completion"
    doc = parse_body(orjson.dumps(chunk), "application/json")
    assert (doc.kind, doc.text) == ("completion", "abc")


@pytest.mark.parametrize(
    ("body", "kind", "checks"),
    [
        (
            {
                "object": "chat.completion",
                "choices": [
                    {
                        "message": {
                            "content": "hi",
                            "tool_calls": [{"function": {"name": "f", "arguments": '{"b": 1, "a": 2}'}}],
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            },
            "chat",
            {"text": "hi", "tool_calls": (("f", '{"a":2,"b":1}'),), "completion_tokens": 1},
        ),
        (
            {"object": "list", "data": [{"object": "embedding", "embedding": [0.1, 0.2]}]},
            "embedding",
            {"embeddings": ((0.1, 0.2),)},
        ),
        ({"label": "spam", "score": 0.9}, "json", {"label": "spam"}),
        ([1, 2, 3], "json", {"document": [1, 2, 3]}),
    ],
)
def test_json_answers_are_recognised_without_configuration(body: object, kind: str, checks: dict[str, object]) -> None:
    """Chat, embeddings, classifier labels and other JSON are told apart by shape."""
    out = parse_body(orjson.dumps(body), "application/json")
    assert out.kind == kind
    for key, value in checks.items():
        assert getattr(out, key) == value


def test_text_and_empty_bodies() -> None:
    """Non-JSON bodies are text; empty bodies are empty."""
    text = parse_body(b"plain words", "text/plain")
    assert (text.kind, text.shape, text.text, text.parse_error) == ("text", "text", "plain words", None)
    assert parse_body(b"", "application/json").kind == "empty"


def test_a_broken_json_body_counts_with_a_parse_error() -> None:
    """A body that claims to be JSON but does not parse is text with parse_error bad_json, never an exception."""
    out = parse_body(b'{"object": "chat.completion", "choices": [}', "application/json")
    assert (out.kind, out.shape, out.parse_error) == ("text", "openai.chat", "bad_json")


def _record(meta: dict[str, object], **bodies: bytes) -> dict[bytes, bytes]:
    fields = {b"meta": orjson.dumps(meta)}
    fields.update({f"body.{k}".encode(): v for k, v in bodies.items()})
    return fields


def _meta(**arms: dict[str, object]) -> dict[str, object]:
    return {"v": 1, "request_id": "r1", "time": 1000.0, "route": "/*", "arms": arms}


def _arm(upstream: str, role: str, **extra: object) -> dict[str, object]:
    arm: dict[str, object] = {
        "upstream": upstream,
        "role": role,
        "status": 200,
        "error": None,
        "start_ms": 1.0,
        "first_chunk_ms": 5.0,
        "duration_ms": 20.0,
        "ttfb_ms": 3.0,
        "headers": [],
    }
    arm.update(extra)
    return arm


def test_record_with_gzip_body_is_decoded() -> None:
    """Bodies recorded with Content-Encoding are decompressed before comparison."""
    body = gzip.compress(orjson.dumps({"label": "ok"}))
    meta = _meta(live=_arm("incumbent", "live", headers=[["content-encoding", "gzip"]]))
    record = parse_record(_record(meta, live=body, request=b'{"model": "m1", "stream": false}'))
    assert record.arms["live"].output.label == "ok"
    assert (record.model, record.streaming) == ("m1", False)


def test_streamed_arm_time_to_first_token_is_first_chunk() -> None:
    """TTFT is the first body chunk for streams, the whole duration for plain answers."""
    meta = _meta(live=_arm("incumbent", "live", headers=[["content-type", "text/event-stream"]]))
    record = parse_record(_record(meta, live=_sse(_delta("x"), _delta(finish="stop"))))
    assert record.arms["live"].ttft_ms == 4.0
    plain = parse_record(_record(_meta(live=_arm("incumbent", "live")), live=b'{"a": 1}'))
    assert plain.arms["live"].ttft_ms == 20.0


@pytest.mark.parametrize(
    "fields",
    [
        {b"meta": b"not json"},
        {b"meta": orjson.dumps({"v": 99, "arms": {}})},
        {b"meta": orjson.dumps({"v": 1, "arms": {}})},
        {b"other": b"x"},
    ],
)
def test_unreadable_entries_are_poison(fields: dict[bytes, bytes]) -> None:
    """Anything but a version-1 record raises PoisonRecord with a reason."""
    with pytest.raises(PoisonRecord):
        parse_record(fields)


def _tgi_event(index: int, text: str, *, special: bool = False, last: str | None = None) -> dict[str, object]:
    details = {"finish_reason": "length", "generated_tokens": index, "seed": None} if last is not None else None
    token = {"id": 100 + index, "text": text, "logprob": -0.25, "special": special}
    return {"index": index, "token": token, "generated_text": last, "details": details}


def _tgi(*events: Mapping[str, object]) -> bytes:
    return b"".join(b"data:" + orjson.dumps(e) + b"\n\n" for e in events)


def test_a_tgi_stream_is_not_read_as_an_openai_stream() -> None:
    """TGI's /generate_stream is tgi.generate: its tokens' text, details' finish reason and count, no error."""
    out = parse_body(_tgi(_tgi_event(1, "Hello"), _tgi_event(2, " world", last="Hello world")), "text/event-stream")
    assert (out.shape, out.kind, out.text, out.stream_error) == ("tgi.generate", "completion", "Hello world", None)
    assert (out.finish_reason, out.completion_tokens, out.prompt_tokens) == ("length", 2, None)


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([_tgi_event(1, "Hello")], id="error-after-a-token"),
        pytest.param([], id="error-only"),
    ],
)
def test_a_tgi_error_event_is_a_stream_error(events: list[dict[str, object]]) -> None:
    """TGI's {"error", "error_type"} event inside a 200 stream is stream_error, with or without tokens before it."""
    error = {"error": "Request failed during generation: Server error: CUDA out of memory", "error_type": "generation"}
    out = parse_body(_tgi(*events, error), "text/event-stream")
    assert (out.shape, out.stream_error) == ("tgi.generate", "stream_error")


def test_a_tgi_style_error_inside_an_openai_stream_is_a_stream_error() -> None:
    """TGI's OpenAI-compatible routes send the same error event: a chat stream that gets it failed."""
    error = {"error": "Request failed during generation", "error_type": "generation"}
    out = parse_sse(_sse(_delta("Hel"), error, done=False))
    assert (out.shape, out.text, out.stream_error) == ("openai.chat", "Hel", "stream_error")


def _ollama(*lines: dict[str, object]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def test_an_ollama_error_line_mid_stream_is_a_stream_error() -> None:
    """Ollama reports a failure mid-stream as an {"error"} line in a 200 answer: stream_error, text so far kept."""
    line = {"model": "gemma3", "created_at": "2025-10-26T17:21:21.196249Z", "response": " Yes", "done": False}
    out = parse_body(
        _ollama(line, {"error": "an error was encountered while running the model"}), "application/x-ndjson"
    )
    assert (out.shape, out.text, out.stream_error, out.streamed) == ("ollama", " Yes", "stream_error", True)


def test_an_unknown_stream_is_text_and_never_an_error() -> None:
    """JSON events of no known API: shape sse, kind text, each event's data one a line, no error, even unfinished."""
    events = [{"seq": 1, "value": 0.5}, {"seq": 2, "value": 0.75}]
    out = parse_body(_sse(*events, done=False), "text/event-stream")
    assert (out.shape, out.kind, out.streamed, out.stream_error, out.parse_error) == ("sse", "text", True, None, None)
    assert out.text == '{"seq":1,"value":0.5}\n{"seq":2,"value":0.75}'
    with_done = parse_body(_sse(*events), "text/event-stream")
    assert (with_done.shape, with_done.text) == ("sse", out.text)  # [DONE] alone does not make it OpenAI's


def test_a_stream_of_plain_text_events_is_text_without_a_parse_error() -> None:
    """Events whose data is not JSON at all are a text stream: their data, no bad_sse_event."""
    out = parse_body(b"data: Hello\n\ndata:  world\n\n", "text/event-stream")
    assert (out.shape, out.text, out.parse_error, out.stream_error) == ("sse", "Hello\n world", None, None)


def test_unknown_json_lines_are_the_ndjson_shape_without_an_error() -> None:
    """JSON lines of no known API: shape ndjson, their text fields joined, no error."""
    out = parse_body(_ollama({"token": "Hel"}, {"token": "lo"}), "application/x-ndjson")
    assert (out.shape, out.kind, out.text, out.stream_error) == ("ndjson", "text", "Hello", None)


def test_a_stream_that_died_inside_its_first_event_is_still_its_api() -> None:
    """No event could be read, but the bytes say OpenAI chat: truncated_stream, as for any unfinished chat stream."""
    body = _sse(_delta("Hello"), done=False)[:-30]
    out = parse_body(body, "text/event-stream")
    assert (out.shape, out.stream_error, out.text) == ("openai.chat", "truncated_stream", "")

"""Every common LLM answer shape, plain and streamed, read from realistic wire captures in tests/payloads/."""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.comparator.parse import STREAM_ERROR, TRUNCATED_STREAM, PoisonRecord, parse_body, parse_record, prompt_text

PAYLOADS = Path(__file__).parent / "payloads"
CONTENT_TYPES = {
    ".json": "application/json",
    ".sse": "text/event-stream; charset=utf-8",
    ".ndjson": "application/x-ndjson",
    ".txt": "text/plain",
}

WEATHER_PARIS = ("get_weather", '{"location":"Paris, France","unit":"celsius"}')
TIME_PARIS = ("get_time", '{"timezone":"Europe/Paris"}')
WEATHER_SF = ("get_weather", '{"location":"San Francisco, CA","unit":"fahrenheit"}')
PARIS = "The capital of France is Paris."
VECTORS = (
    (0.0023064255, -0.009327292, 0.015797347, -0.0077780345, 0.028473, -0.0411862, 0.0019327416, 0.0523811),
    (-0.012741, 0.0380149, -0.0050372, 0.0214478, -0.0297651, 0.0066381, 0.0449217, -0.0183355),
)


def _payload(name: str) -> tuple[bytes, str]:
    path = PAYLOADS / name
    return path.read_bytes(), CONTENT_TYPES[path.suffix]


def _expect(
    shape: str,
    kind: str = "chat",
    text: str | None = PARIS,
    *,
    calls: tuple[tuple[str, str], ...] = (),
    finish: str | None = None,
    tokens: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None),
    streamed: bool = False,
    stream_error: str | None = None,
) -> dict[str, Any]:
    prompt, completion, reasoning, cached = tokens
    return {
        "shape": shape,
        "kind": kind,
        "text": text,
        "tool_calls": calls,
        "finish_reason": finish,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "reasoning_tokens": reasoning,
        "cached_tokens": cached,
        "streamed": streamed,
        "stream_error": stream_error,
        "truncated": False,
        "parse_error": None,
    }


CHAT, COMPLETION, EMBEDDING = "openai.chat", "openai.completion", "openai.embedding"
RESPONSES, ANTHROPIC = "openai.responses", "anthropic.messages"
TGI, OLLAMA, UNKNOWN_SSE = "tgi.generate", "ollama", "sse"
STRUCTURED = '{"name":"Science Fair","date":"Friday","participants":["Alice","Bob"]}'

SHAPES = [
    pytest.param(
        "openai_chat.json", _expect(CHAT, finish="stop", tokens=(1843, 215, 192, 1536)), id="chat-reasoning-cached"
    ),
    pytest.param(
        "openai_chat_tool_calls.json",
        _expect(CHAT, text="", calls=(WEATHER_PARIS, TIME_PARIS), finish="tool_calls", tokens=(82, 51, 0, 0)),
        id="chat-parallel-tool-calls",
    ),
    pytest.param(
        "openai_chat_structured.json",
        _expect(CHAT, text=STRUCTURED, finish="stop", tokens=(92, 17, 0, 0)),
        id="chat-structured-output",
    ),
    pytest.param(
        "openai_chat_stream.sse",
        _expect(CHAT, finish="stop", tokens=(24, 8, 0, 0), streamed=True),
        id="chat-stream-include-usage",
    ),
    pytest.param(
        "openai_chat_stream_tool_calls.sse",
        _expect(CHAT, text="", calls=(WEATHER_PARIS, TIME_PARIS), finish="tool_calls", streamed=True),
        id="chat-stream-tool-call-deltas",
    ),
    pytest.param(
        "openai_completion.json",
        _expect(COMPLETION, "completion", "\n\nThis is indeed a test", finish="length", tokens=(5, 7, None, None)),
        id="completion",
    ),
    pytest.param(
        "openai_completion_stream.sse",
        _expect(COMPLETION, "completion", "\n\nThis is indeed a test", finish="stop", streamed=True),
        id="completion-stream",
    ),
    pytest.param(
        "openai_embedding_float.json",
        _expect(EMBEDDING, "embedding", None, tokens=(9, None, None, None)),
        id="embedding-float",
    ),
    pytest.param(
        "openai_embedding_base64.json",
        _expect(EMBEDDING, "embedding", None, tokens=(9, None, None, None)),
        id="embedding-base64",
    ),
    pytest.param(
        "openai_responses.json",
        _expect(RESPONSES, finish="completed", tokens=(1236, 87, 64, 1024)),
        id="responses-reasoning-item-skipped",
    ),
    pytest.param(
        "openai_responses_function_call.json",
        _expect(RESPONSES, text="", calls=(WEATHER_PARIS,), finish="completed", tokens=(291, 23, 0, 0)),
        id="responses-function-call",
    ),
    pytest.param(
        "openai_responses_stream.sse",
        _expect(RESPONSES, finish="completed", tokens=(37, 8, 0, 0), streamed=True),
        id="responses-stream",
    ),
    pytest.param(
        "openai_responses_stream_function_call.sse",
        _expect(
            RESPONSES, text="", calls=(WEATHER_PARIS,), finish="completed", tokens=(291, 150, 128, 256), streamed=True
        ),
        id="responses-stream-function-call-deltas",
    ),
    pytest.param(
        "openai_responses_stream_incomplete.sse",
        _expect(
            RESPONSES, text="Once upon a time, in a", finish="max_output_tokens", tokens=(18, 7, 0, 0), streamed=True
        ),
        id="responses-stream-incomplete",
    ),
    pytest.param(
        "openai_responses_stream_failed.sse",
        _expect(RESPONSES, text="Let me", finish="failed", streamed=True, stream_error=STREAM_ERROR),
        id="responses-stream-failed",
    ),
    pytest.param(
        "openai_responses_stream_error.sse",
        _expect(RESPONSES, text="", streamed=True, stream_error=STREAM_ERROR),
        id="responses-stream-error-event",
    ),
    pytest.param(
        "anthropic_message.json",
        _expect(ANTHROPIC, finish="end_turn", tokens=(21 + 2048, 153, None, 2048)),
        id="anthropic-thinking-skipped-cache-read",
    ),
    pytest.param(
        "anthropic_message_tool_use.json",
        _expect(
            ANTHROPIC,
            text="I'll check the current weather in San Francisco for you.",
            calls=(WEATHER_SF,),
            finish="tool_use",
            tokens=(384 + 1200, 94, None, 0),
        ),
        id="anthropic-tool-use",
    ),
    pytest.param(
        "anthropic_stream.sse",
        _expect(ANTHROPIC, finish="end_turn", tokens=(85 + 1024, 214, None, 1024), streamed=True),
        id="anthropic-stream-thinking-deltas-skipped",
    ),
    pytest.param(
        "anthropic_stream_tool_use.sse",
        _expect(
            ANTHROPIC,
            text="Okay, let's check the weather for San Francisco, CA:",
            calls=(WEATHER_SF,),
            finish="tool_use",
            tokens=(472, 89, None, 0),
            streamed=True,
        ),
        id="anthropic-stream-input-json-delta",
    ),
    pytest.param(
        "anthropic_stream_error.sse",
        _expect(ANTHROPIC, text="Hello", tokens=(12, 1, None, 0), streamed=True, stream_error=STREAM_ERROR),
        id="anthropic-stream-error-event",
    ),
    pytest.param("anthropic_error.json", _expect(ANTHROPIC, "json", None), id="anthropic-error-body"),
    pytest.param(
        "tgi_generate.json",
        _expect(TGI, "completion", finish="eos_token", tokens=(15, 8, None, None)),
        id="tgi-generate-details-prefill",
    ),
    pytest.param("tgi_generate_list.json", _expect(TGI, "completion"), id="tgi-generate-list-form"),
    pytest.param(
        "tgi_generate_stream.sse",
        _expect(TGI, "completion", finish="eos_token", tokens=(15, 8, None, None), streamed=True),
        id="tgi-generate-stream-special-eos-skipped",
    ),
    pytest.param(
        "ollama_generate_stream.ndjson",
        _expect(OLLAMA, "completion", finish="stop", tokens=(32, 8, None, None), streamed=True),
        id="ollama-generate-stream",
    ),
    pytest.param(
        "ollama_chat_stream.ndjson",
        _expect(OLLAMA, finish="stop", tokens=(30, 8, None, None), streamed=True),
        id="ollama-chat-stream",
    ),
    pytest.param(
        "ollama_generate.json",
        _expect(OLLAMA, "completion", finish="stop", tokens=(32, 8, None, None)),
        id="ollama-generate-not-streamed",
    ),
    pytest.param(
        "ollama_chat_tool_calls.json",
        _expect(OLLAMA, text="", calls=(WEATHER_PARIS,), finish="stop", tokens=(169, 23, None, None)),
        id="ollama-chat-not-streamed-tool-call",
    ),
    pytest.param(
        "llamacpp_completion_stream.sse",  # llama.cpp's native /completion: a format not known here
        _expect(UNKNOWN_SSE, "text", streamed=True),
        id="unknown-format-stream-is-sse-text",
    ),
    pytest.param("classifier.json", _expect("json", "json", None), id="generic-json"),
    pytest.param("plain.txt", _expect("text", "text", "Bonjour! Paris is the capital of France.\n"), id="text"),
]
FILES = [param.values[0] for param in SHAPES]


def _known_stream(expected: Any) -> bool:
    """A stream of a known API (a stream of an unknown format has no rule saying when it is complete)."""
    return bool(expected["streamed"]) and expected["shape"] != UNKNOWN_SSE


STREAMS = [param.values[0] for param in SHAPES if _known_stream(param.values[1])]


@pytest.mark.parametrize(("name", "expected"), SHAPES)
def test_every_answer_shape_is_recognised(name: str, expected: dict[str, Any]) -> None:
    """Each realistic capture is read into its shape, kind, text, tool calls, finish reason and tokens."""
    out = parse_body(*_payload(name))
    assert {key: getattr(out, key) for key in expected} == expected


def test_an_empty_body_is_the_empty_shape() -> None:
    """No bytes at all: kind and shape empty."""
    out = parse_body(b"", "application/json")
    assert (out.kind, out.shape, out.text) == ("empty", "empty", None)


@pytest.mark.parametrize("name", ["openai_chat_structured.json", "openai_responses.json", "openai_chat.json"])
def test_an_answer_holding_json_is_compared_as_a_document(name: str) -> None:
    """JSON mode and structured outputs expose the parsed JSON as the document; prose answers have none."""
    out = parse_body(*_payload(name))
    expected = orjson.loads(STRUCTURED) if name == "openai_chat_structured.json" else None
    assert out.document == expected


def test_a_streamed_json_answer_is_a_document_too() -> None:
    """The deltas of a JSON-mode stream join into text whose JSON is the document."""
    chunks = [STRUCTURED[i : i + 9] for i in range(0, len(STRUCTURED), 9)]
    body = b"".join(
        b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]}) + b"\n\n"
        for d in [{"role": "assistant", "content": ""}, *({"content": c} for c in chunks)]
    )
    out = parse_body(body + b"data: [DONE]\n\n", "text/event-stream")
    assert out.text == STRUCTURED and out.document == orjson.loads(STRUCTURED)


@pytest.mark.parametrize("name", ["openai_embedding_float.json", "openai_embedding_base64.json"])
def test_a_base64_embedding_round_trips_to_its_float_values(name: str) -> None:
    """Base64 little-endian float32 vectors decode to the same values as the float format, within 1e-6."""
    out = parse_body(*_payload(name))
    assert len(out.embeddings) == len(VECTORS)
    for got, want in zip(out.embeddings, VECTORS, strict=True):
        assert len(got) == len(want) and all(abs(a - b) < 1e-6 for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("bad", ["not base64!", "ZicXO4DRGLw", "ZicXOw==Zic=", ""])
def test_an_unreadable_base64_embedding_counts_with_a_parse_error(bad: str) -> None:
    """A base64 string that does not decode to float32s is a parse_error on a counted record, never poison."""
    body = orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": bad}]})
    fields = _record_fields(body)
    out = parse_record(fields).arms["live"].output
    assert out.kind == "embedding"
    assert out.parse_error == ("bad_base64" if bad else None)


@pytest.mark.parametrize("name", FILES)
def test_a_capture_cut_by_the_body_cap_is_a_partial_answer(name: str) -> None:
    """Cut anywhere with truncated=True: no exception, no parse error, never truncated_stream, shape kept."""
    body, content_type = _payload(name)
    full = parse_body(body, content_type)
    for cut in range(1, len(body), max(1, len(body) // 61)):
        out = parse_body(body[:cut], content_type, truncated=True)
        assert out.truncated and out.parse_error is None, cut
        assert out.stream_error in (None, full.stream_error), cut
        if cut >= len(body) // 2:
            assert out.shape == full.shape, cut
        if out.streamed:
            assert (full.text or "").startswith(out.text or ""), cut


@pytest.mark.parametrize("name", STREAMS)
def test_a_stream_that_stopped_early_on_its_own_is_truncated_stream(name: str) -> None:
    """The same cut without the proxy's cap is a stream that ended before its last event."""
    body, content_type = _payload(name)
    out = parse_body(body[: len(body) // 2], content_type, truncated=False)  # before any last or error event
    assert (out.streamed, out.truncated, out.stream_error) == (True, False, TRUNCATED_STREAM)


CUTS = [
    pytest.param("tgi_generate_stream.sse", False, TGI, TRUNCATED_STREAM, id="tgi-stream-stopped-early"),
    pytest.param("tgi_generate_stream.sse", True, TGI, None, id="tgi-stream-cut-by-the-cap"),
    pytest.param("ollama_generate_stream.ndjson", False, OLLAMA, TRUNCATED_STREAM, id="ollama-stream-stopped-early"),
    pytest.param("ollama_chat_stream.ndjson", True, OLLAMA, None, id="ollama-stream-cut-by-the-cap"),
    pytest.param("llamacpp_completion_stream.sse", False, UNKNOWN_SSE, None, id="unknown-stream-stopped-early"),
]


@pytest.mark.parametrize(("name", "truncated", "shape", "stream_error"), CUTS)
def test_a_stream_cut_in_half_is_truncated_stream_only_when_its_api_is_known_and_the_cap_did_not_cut_it(
    name: str, truncated: bool, shape: str, stream_error: str | None
) -> None:
    """Half a TGI or Ollama stream is truncated_stream, or a partial answer when cut by the cap; half a stream of
    an unknown format is never an error."""
    body, content_type = _payload(name)
    out = parse_body(body[: len(body) // 2], content_type, truncated=truncated)
    assert (out.shape, out.stream_error, out.parse_error) == (shape, stream_error, None)
    assert out.streamed and PARIS.startswith(out.text or "-") and out.text != PARIS


@pytest.mark.parametrize("name", ["ollama_generate_stream.ndjson", "ollama_chat_stream.ndjson"])
@pytest.mark.parametrize("content_type", ["application/json", ""])
def test_ndjson_is_told_by_its_lines_without_its_content_type(name: str, content_type: str) -> None:
    """JSON lines sent as application/json, or with no content type, are still read as a stream."""
    body, _ = _payload(name)
    expected = parse_body(*_payload(name))
    assert parse_body(body, content_type) == expected


def test_a_truncated_gzip_body_inflates_as_far_as_it_goes() -> None:
    """A compressed capture cut by the cap still yields the stream's text so far, marked truncated."""
    body, _ = _payload("openai_chat_stream.sse")
    compressed = gzip.compress(body)[: len(gzip.compress(body)) * 2 // 3]
    arm = {"headers": [["Content-Type", "text/event-stream"], ["Content-Encoding", "gzip"]], "truncated": True}
    out = parse_record(_record_fields(compressed, **arm)).arms["live"].output
    assert out.streamed and out.truncated and out.stream_error is None and PARIS.startswith(out.text or "-")


DEEP = [
    pytest.param(b"[" * 1000 + b"]" * 1000, id="array-1000"),
    pytest.param(b'{"a":' * 1000 + b"1" + b"}" * 1000, id="object-1000"),
    pytest.param(b"[" * 5000 + b"]" * 5000, id="array-5000-past-orjson-limit"),
    pytest.param(b"data: " + b"[" * 1000 + b"]" * 1000 + b"\n\ndata: [DONE]\n\n", id="sse-event-1000"),
]


@pytest.mark.parametrize("body", DEEP)
def test_deeply_nested_json_is_a_parse_error_not_an_exception(body: bytes) -> None:
    """A document nested a thousand levels deep parses to a parse_error, never to a RecursionError."""
    out = parse_body(body, "application/json")
    assert out.parse_error in ("too_deep", "bad_sse_event") and out.document is None
    record = parse_record(_record_fields(body, request=body))
    assert record.arms["live"].output.parse_error is not None and record.prompt_text == ""


def test_deep_json_inside_an_answer_never_raises() -> None:
    """Deep JSON in answer text or tool arguments is kept as text: no document, arguments compared as text."""
    deep = "[" * 600 + "]" * 600
    message = {"content": deep, "tool_calls": [{"function": {"name": "f", "arguments": deep}}]}
    out = parse_body(orjson.dumps({"object": "chat.completion", "choices": [{"message": message}]}), "")
    assert (out.kind, out.text, out.document, out.parse_error) == ("chat", deep, None, None)
    assert out.tool_calls == (("f", deep),)


def test_parse_record_raises_nothing_but_poison_records_on_mangled_input() -> None:
    """Random cuts, byte flips and junk in meta and bodies give a Record or a PoisonRecord, nothing else."""
    rng = random.Random(7)
    bodies = [_payload(name)[0] for name in FILES]
    for _ in range(400):
        body = bytearray(rng.choice(bodies))
        for _ in range(rng.randint(0, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        body = body[: rng.randint(0, len(body))]
        fields = _record_fields(bytes(body), headers=[["content-type", rng.choice(list(CONTENT_TYPES.values()))]])
        if rng.random() < 0.3:
            meta = bytearray(fields[b"meta"])
            meta[rng.randrange(len(meta))] = rng.randrange(256)
            fields[b"meta"] = bytes(meta)
        try:
            parse_record(fields)
        except PoisonRecord:
            pass


def test_prompt_text_reads_anthropic_responses_and_tgi_requests() -> None:
    """System blocks, block-list contents, Responses instructions and input items, TGI inputs count as prompt text."""
    anthropic = {
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"}]},
        ],
    }
    responses = {
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        ],
    }
    assert prompt_text(orjson.dumps(anthropic)) == "Be brief. Weather in Paris?"
    assert prompt_text(orjson.dumps(responses)) == "Be brief. Weather in Paris? 18C"
    assert prompt_text(orjson.dumps({"instructions": "Hi.", "input": "Paris?"})) == "Hi. Paris?"
    assert prompt_text(b'{"messages": [{"role": "user", "content": "Paris?"}]}') == "Paris?"
    assert (
        prompt_text(b'{"inputs": "[INST] Paris? [/INST]", "parameters": {"details": true}}') == "[INST] Paris? [/INST]"
    )


def test_a_version_2_record_keeps_each_arm_model() -> None:
    """Version-2 records (one shadow arm per candidate) are read, with the model each arm was asked for."""
    body, _ = _payload("anthropic_message.json")
    fields = _record_fields(body, model="claude-sonnet-4-5")
    meta = orjson.loads(fields[b"meta"])
    meta["v"] = 2
    meta["arms"]["shadow.cand"] = meta["arms"].pop("live")
    fields = {b"meta": orjson.dumps(meta), b"body.shadow.cand": body, b"body.request": fields[b"body.request"]}
    arm = parse_record(fields).arms["shadow.cand"]
    assert (arm.model, arm.output.shape, arm.output.text) == ("claude-sonnet-4-5", ANTHROPIC, PARIS)


def _record_fields(body: bytes, *, request: bytes = b'{"model": "m"}', **arm: Any) -> dict[bytes, bytes]:
    live = {"upstream": "incumbent", "role": "live", "status": 200, "error": None, "duration_ms": 20.0, "headers": []}
    live.update(arm)
    meta = {"v": 1, "request_id": "r1", "time": 1000.0, "route": "/*", "arms": {"live": live}}
    return {b"meta": orjson.dumps(meta), b"body.live": body, b"body.request": request}

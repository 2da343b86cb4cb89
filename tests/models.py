"""Fake model servers that speak the real wire formats (OpenAI chat, embeddings, Responses; Anthropic Messages).

Each is an aiohttp handler for the ``upstreams`` fixture. They answer the way the public API references
describe, so the official SDKs accept them, and they check the request the way a real server would
(a vLLM server refuses any model name but its own).
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


async def _stream(request: web.Request, events: list[bytes], delay: float = 0.0) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for event in events:
        await resp.write(event)
        if delay:
            await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


def openai_chat(words: list[str], *, served_model: str | None = None, delay: float = 0.0, status: int = 200) -> Handler:
    """Chat completions, plain or streamed (with include_usage); with ``served_model`` it answers 404 to any
    other model name, as vLLM does ("The model `x` does not exist.")."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model", "")
        if served_model is not None and model != served_model:
            error = {"object": "error", "message": f"The model `{model}` does not exist.", "type": "NotFoundError"}
            return web.json_response({**error, "code": 404}, status=404)
        if delay:
            await asyncio.sleep(delay)
        if status != 200:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=status)
        text = " ".join(words)
        usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words)}
        base = {"id": "chatcmpl-1", "created": 1, "model": model}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            return web.json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})]
        for i, word in enumerate(words):
            delta = {"content": word if i == 0 else " " + word}
            events.append(_sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        events.append(_sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(_sse({**chunk, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await _stream(request, events)

    return handler


def openai_embeddings(scale: float = 1.0) -> Handler:
    """Embeddings: float lists, or base64 of little-endian float32 when asked (the openai SDK's default)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for index, text in enumerate(inputs):
            vector = [scale * (len(str(text)) % 7 + 1), 0.5, -0.25, float(index)]
            if body.get("encoding_format") == "base64":
                packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": packed})
            else:
                data.append({"object": "embedding", "index": index, "embedding": vector})
        usage = {"prompt_tokens": 4, "total_tokens": 4}
        return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})

    return handler


def openai_responses(text: str) -> Handler:
    """The Responses API, plain or streamed with typed events."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = {
            "input_tokens": 12,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 17,
        }
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        response = {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": body["model"],
            "output": [item],
            "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(response)
        created = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [_sse({"type": "response.created", "sequence_number": 0, "response": created}, "response.created")]
        seq = 1
        for word in text.split(" "):
            delta = {
                "type": "response.output_text.delta",
                "sequence_number": seq,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": word + " ",
            }
            events.append(_sse(delta, "response.output_text.delta"))
            seq += 1
        done = {"type": "response.completed", "sequence_number": seq, "response": response}
        events.append(_sse(done, "response.completed"))
        return await _stream(request, events)

    return handler


def anthropic_messages(text: str) -> Handler:
    """The Anthropic Messages API, plain or streamed (message_start ... message_stop)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = {"input_tokens": 11, "output_tokens": len(text.split())}
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(message)
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events = [
            _sse({"type": "message_start", "message": start}, "message_start"),
            _sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            ),
            _sse({"type": "ping"}, "ping"),
        ]
        for i, word in enumerate(text.split(" ")):
            delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
            events.append(_sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"))
        events += [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
        return await _stream(request, events)

    return handler


def long_stream(total_bytes: int) -> Handler:
    """A chat stream of about ``total_bytes`` (a long reasoning answer), properly finished."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body.get("model", "m")}
        piece = _sse({**chunk, "choices": [{"index": 0, "delta": {"content": "word " * 20}, "finish_reason": None}]})
        events = [piece] * (total_bytes // len(piece) + 1)
        events.append(_sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        events.append(b"data: [DONE]\n\n")
        return await _stream(request, events)

    return handler

"""The official openai SDK, pointed at the proxy, works unchanged (streaming included)."""

from __future__ import annotations

import asyncio

import openai
import orjson
from aiohttp import web

from .conftest import eventually, records


def _completion(text: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def model_server(words: list[str]):  # type: ignore[no-untyped-def]
    """An OpenAI-compatible chat endpoint answering with the given words."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(_completion(" ".join(words)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"role": "assistant"}))
        for word in words:
            await resp.write(_chunk({"content": word + " "}))
            await asyncio.sleep(0.002)
        await resp.write(_chunk({}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    return handler


async def test_openai_sdk_through_the_proxy(upstreams, proxies, redis_url, redis_client) -> None:
    """Plain and streamed chat completions come back as the incumbent produced them; both arms recorded."""
    incumbent = await upstreams(model_server(["hello", "world"]))
    candidate = await upstreams(model_server(["hi", "world"]))
    proxy = await proxies(
        incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"redis_url": redis_url}
    )
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="sk-test", max_retries=0)
    messages = [{"role": "user", "content": "say hello"}]
    completion = await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "hello world"
    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)  # type: ignore[arg-type]
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices[0].delta.content]
    assert "".join(pieces) == "hello world "
    await client.close()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 2)
    streamed = records(redis_client)[1]
    shadow_body = streamed["body.shadow.candidate"]
    assert b'"content":"hi "' in shadow_body and shadow_body.endswith(b"data: [DONE]\n\n")
    assert streamed["meta"]["arms"]["shadow.candidate"]["chunks"]["count"] >= 2

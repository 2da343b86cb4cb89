"""Records are keyed by the proxy's own id, and only an arm's own failures count as its errors."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker

from .conftest import echo, eventually, make_config, records
from .models import openai_chat


async def _report(sections: dict[str, object], redis_url: str) -> dict[str, object]:
    config = make_config(**sections, record={"redis_url": redis_url})
    worker = Worker(config, redis_url)
    try:
        await worker.run(burst=True)
    finally:
        await worker.close()
    return (await load_report(config, redis_url, since_seconds=3600)).as_json()


async def test_two_requests_with_one_client_id_are_two_records(upstreams, proxies, redis_url, redis_client) -> None:
    """The client's x-request-id is echoed and kept, but each request has its own record and counts."""
    incumbent, candidate = await upstreams(openai_chat(["a"])), await upstreams(openai_chat(["a"]))
    sections = {"incumbent": {"url": incumbent.url}, "candidate": {"url": candidate.url}}
    proxy = await proxies(**sections, record={"redis_url": redis_url})
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.post(
                f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                json={"model": "m", "messages": []},
                headers={"X-Request-Id": "same-id"},
            ) as resp:
                assert resp.status == 200 and resp.headers["X-Request-Id"] == "same-id"
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 2)
    found = records(redis_client)
    assert len({r["request_id"] for r in found}) == 2
    assert [r["meta"]["client_request_id"] for r in found] == ["same-id", "same-id"]
    assert {h for r in candidate.requests for k, h in r["headers"] if k.lower() == "x-request-id"} == {"same-id"}
    summary = (await _report(sections, redis_url))["summary"]
    assert summary["pairs"] == 2  # type: ignore[index]


async def test_a_client_cannot_choose_ids_that_are_never_mirrored(upstreams, proxies) -> None:
    """Sampling hashes the proxy's id: one client id sent 200 times is mirrored about half the time at 0.5."""
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        shadow={"sample_rate": 0.5},
        record={"enabled": False},
    )
    async with aiohttp.ClientSession() as client:
        for _ in range(200):
            url = f"http://127.0.0.1:{proxy.port}/v1/x"
            async with client.post(url, data=b"{}", headers={"X-Request-Id": "steer"}) as resp:
                await resp.read()
    await eventually(lambda: len(candidate.requests) > 0)
    sent = proxy.runtime.metrics.value("shadow_proxy_mirrors_sent_total", target="candidate")
    assert 60 <= sent <= 140  # binomial(200, 0.5): outside this range with probability < 1e-8


async def test_a_client_that_leaves_is_not_an_error_of_the_arm_that_served_it(upstreams, proxies, redis_url) -> None:
    """Users pressing stop are counted apart; the error gate sees only the arms' own failures."""
    release = asyncio.Event()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n')
        await release.wait()
        await resp.write(b"data: [DONE]\n\n")
        return resp

    incumbent, candidate = await upstreams(slow_stream), await upstreams(slow_stream)
    sections = {"incumbent": {"url": incumbent.url}, "candidate": {"url": candidate.url}}
    proxy = await proxies(**sections, record={"redis_url": redis_url})
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
            async with client.post(url, json={"model": "m", "stream": True}) as resp:
                await resp.content.readany()  # the first event, then the user presses stop
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_client_disconnects_total") == 3)
    release.set()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 3)
    summary = (await _report(sections, redis_url))["summary"]
    assert summary["answers"]["excluded"] == {"client_disconnected": 3}  # type: ignore[index]
    assert summary["errors"]["incumbent"]["by_class"] == {}  # type: ignore[index]
    assert summary["pairs"] == 0  # type: ignore[index]

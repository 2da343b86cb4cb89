"""Recording: one record per request in a Redis stream, secrets masked, Redis trouble absorbed and counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import redis
from aiohttp import web

from proxy.tools.embedded_redis import EmbeddedRedis

from .conftest import echo, eventually, records


async def _sse(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for word in ("Hel", "lo", "!"):
        await resp.write(f'data: {{"delta": "{word}"}}\n\n'.encode())
        await asyncio.sleep(0.005)
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def test_one_record_per_request_with_both_arms(upstreams, proxies, redis_url, redis_client) -> None:
    """Each request becomes one versioned record with request metadata and both arms' outcomes and timings."""
    incumbent = await upstreams(_sse)
    candidate = await upstreams(_sse)
    proxy = await proxies(
        incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"redis_url": redis_url}
    )
    async with aiohttp.ClientSession() as client:
        for i in range(3):
            url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions?n={i}"
            async with client.post(url, data=b'{"stream": true}', headers={"X-Request-Id": f"r{i}"}) as resp:
                await resp.read()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 3)
    found = records(redis_client)
    assert [r["client_request_id"] for r in found] == [b"r0", b"r1", b"r2"]
    assert [r["meta"]["client_request_id"] for r in found] == ["r0", "r1", "r2"]
    assert len({r["request_id"] for r in found}) == 3 and all(len(r["request_id"]) == 32 for r in found)
    record = found[0]
    meta = record["meta"]
    assert record["v"] == b"2" and meta["v"] == 2
    assert (meta["method"], meta["path"], meta["query"], meta["route"]) == ("POST", "/v1/chat/completions", "n=0", "/*")
    assert meta["response_status"] == 200 and meta["shadow_skipped"] is None
    assert record["body.request"] == b'{"stream": true}'
    stream = b'data: {"delta": "Hel"}\n\ndata: {"delta": "lo"}\n\ndata: {"delta": "!"}\n\ndata: [DONE]\n\n'
    assert record["body.live"] == stream and record["body.shadow.candidate"] == stream
    for key, upstream in (("live", "incumbent"), ("shadow.candidate", "candidate")):
        arm = meta["arms"][key]
        assert arm["upstream"] == upstream and arm["status"] == 200 and arm["error"] is None
        assert 0 <= arm["start_ms"] <= arm["first_byte_ms"] <= arm["first_chunk_ms"] <= arm["end_ms"]
        assert arm["bytes"] == len(stream) and arm["truncated"] is False
        assert arm["chunks"]["count"] >= 2 and arm["chunks"]["gap_max_ms"] > 0
        assert ["content-type", "text/event-stream"] in arm["headers"]


async def test_bodies_are_capped_and_marked_truncated(upstreams, proxies, redis_url, redis_client) -> None:
    """Bodies beyond record.max_body_bytes are cut, with sizes and a truncated flag."""

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"r" * 5000)

    incumbent = await upstreams(big)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": redis_url, "max_body_bytes": 100})
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/x", data=b"q" * 300) as resp:
            assert len(await resp.read()) == 5000
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 1)
    (record,) = records(redis_client)
    assert record["body.request"] == b"q" * 100 and record["body.live"] == b"r" * 100
    assert record["meta"]["request"] == {**record["meta"]["request"], "bytes": 300, "truncated": True}
    live = record["meta"]["arms"]["live"]
    assert (live["bytes"], live["captured_bytes"], live["truncated"]) == (5000, 100, True)


async def test_no_secret_reaches_redis(upstreams, proxies, redis_url, redis_client) -> None:
    """Scanning every byte of the stream finds none of the secrets the client or upstreams sent."""
    secrets = [
        "sk-live-SECRET1",
        "COOKIE-SECRET2",
        "APIKEY-SECRET3",
        "QUERY-SECRET4",
        "BODY-SECRET5",
        "SETCOOKIE-SECRET6",
        "TEAM-SECRET7",
    ]

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        resp = web.Response(body=body, content_type="application/json")
        resp.headers.add("Set-Cookie", f"session={secrets[5]}")
        return resp

    incumbent = await upstreams(handler)
    candidate = await upstreams(handler)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        record={"redis_url": redis_url, "redact_json_paths": ["user.key"], "redact_headers": ["x-team-token"]},
    )
    async with aiohttp.ClientSession() as client:
        headers = {
            "Authorization": f"Bearer {secrets[0]}",
            "Cookie": f"c={secrets[1]}",
            "X-Api-Key": secrets[2],
            "X-Team-Token": secrets[6],
        }
        body = b'{"user": {"key": "%s", "name": "ok"}}' % secrets[4].encode()
        url = f"http://127.0.0.1:{proxy.port}/v1/x?api_key={secrets[3]}&x=1"
        async with client.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 1)
    dump = b"".join(k + v for _, fields in redis_client.xrange("{shadow}:records") for k, v in fields.items())
    assert b"[REDACTED]" in dump and b'"name":"ok"' in dump
    for secret in secrets:
        assert secret.encode() not in dump, secret
    # The candidate itself still needs the credentials: redaction is for records only.
    assert dict(candidate.requests[0]["headers"])["Authorization"] == f"Bearer {secrets[0]}"


async def test_stream_is_trimmed(upstreams, proxies, redis_url, redis_client) -> None:
    """XADD MAXLEN ~ keeps the stream near record.maxlen."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": redis_url, "maxlen": 10})
    async with aiohttp.ClientSession() as client:
        for _ in range(400):
            async with client.get(f"http://127.0.0.1:{proxy.port}/x") as resp:
                await resp.read()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 400)
    assert 10 <= redis_client.xlen("{shadow}:records") < 400


async def test_redis_outage_is_absorbed_counted_and_recovered(upstreams, proxies, tmp_path: Path) -> None:
    """Redis stopped mid-traffic: no live errors, drops beyond the queue bound counted exactly, writing resumes."""
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    server.start()
    try:
        incumbent = await upstreams(echo)
        proxy = await proxies(
            incumbent={"url": incumbent.url},
            record={"redis_url": server.url, "queue_max_records": 5, "socket_timeout": 1.0},
        )
        metrics = proxy.runtime.metrics

        async def send(n: int) -> None:
            async with aiohttp.ClientSession() as client:
                for _ in range(n):
                    async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
                        assert resp.status == 200

        await send(5)
        await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 5)
        server.stop()
        await send(20)
        assert metrics.value("shadow_proxy_records_dropped_total", reason="queue_full") == 15
        await eventually(lambda: metrics.value("shadow_proxy_record_write_errors_total") >= 1)
        assert proxy.runtime.recorder is not None and proxy.runtime.recorder.depth == 5
        server.start()
        await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 10)
        await send(5)
        await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 15)
        client = redis.Redis.from_url(server.url)
        stored = {fields[b"request_id"] for _, fields in client.xrange("{shadow}:records")}
        client.close()
        assert len(stored) == 15
        assert metrics.value("shadow_proxy_records_dropped_total", reason="queue_full") == 15
        assert metrics.value("shadow_proxy_requests_total", upstream="incumbent", route="/*", code="200") == 30
    finally:
        server.stop()


async def test_queue_is_bounded_by_bytes(upstreams, proxies, tmp_path: Path) -> None:
    """With Redis down, records beyond record.queue_max_bytes are dropped and counted."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)  # never started: Redis is down throughout
    incumbent = await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        record={"redis_url": server.url, "queue_max_bytes": 4000, "socket_timeout": 1.0, "flush_timeout": 0.2},
    )
    async with aiohttp.ClientSession() as client:
        for _ in range(10):
            async with client.post(f"http://127.0.0.1:{proxy.port}/x", data=b"b" * 1000) as resp:
                assert resp.status == 200
    metrics = proxy.runtime.metrics
    queued = metrics.value("shadow_proxy_records_queued_total")
    assert 0 < queued < 10
    assert queued + metrics.value("shadow_proxy_records_dropped_total", reason="queue_full") == 10
    await proxy.stop()
    assert metrics.value("shadow_proxy_records_dropped_total", reason="shutdown") == queued

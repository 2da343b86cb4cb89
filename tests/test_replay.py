"""`shadow-proxy replay`: recorded requests re-sent to a candidate, new pairs recorded, Ctrl-C is clean."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import orjson
from aiohttp import web

from .conftest import echo, eventually, records


async def _record(upstreams, proxies, redis_url: str, n: int, **record: object):  # type: ignore[no-untyped-def]
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": redis_url, **record})
    async with aiohttp.ClientSession() as client:
        for i in range(n):
            body = b'{"n": %d}' % i if i % 4 else b"x" * 300
            async with client.post(
                f"http://127.0.0.1:{proxy.port}/v1/x?i={i}",
                data=body,
                headers={"Authorization": "Bearer old-secret", "X-Tag": f"t{i}"},
            ) as resp:
                await resp.read()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == n)


def _replay(redis_url: str, candidate: str, *args: str) -> subprocess.Popen[str]:
    target = ["--candidate", candidate] if candidate else []
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "replay", "--redis-url", redis_url, *target, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ.get("PATH", "")},
    )


async def test_replay_sends_recorded_requests_and_records_new_pairs(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """Method, path, query and body are re-sent with fresh credentials; each pair keeps the original answer."""
    await _record(upstreams, proxies, redis_url, 8, max_body_bytes=100)
    candidate = await upstreams(echo)
    process = _replay(redis_url, candidate.url, "--last", "8", "--rate", "200", "--header", "Authorization: Bearer new")
    stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, stderr
    assert "6 of 8 sent, 6 recorded, 0 failed, skipped {'truncated_body': 2}" in stdout
    sent = {r["raw_path"]: r for r in candidate.requests}
    assert sorted(sent) == sorted(f"/v1/x?i={i}" for i in range(8) if i % 4)
    for request in sent.values():
        headers = {k.lower(): v for k, v in request["headers"]}
        assert headers["authorization"] == "Bearer new" and headers["x-tag"].startswith("t")
    replayed = [r for r in records(redis_client) if r["request_id"].startswith(b"replay:")]
    assert len(replayed) == 6
    for record in replayed:
        meta = record["meta"]
        assert meta["replay"]["of"] and meta["arms"]["shadow.candidate"]["status"] == 200
        assert orjson.loads(record["body.shadow.candidate"])["path"] == meta["path"] + "?" + meta["query"]
        original = orjson.loads(record["body.live"])
        assert original == {
            "method": "POST",
            "path": meta["path"] + "?" + meta["query"],
            "bytes": len(record["body.request"]),
        }


async def test_interrupted_replay_stops_cleanly_and_says_how_far_it_got(upstreams, proxies, redis_url) -> None:
    """SIGINT mid-replay exits 0 with the count sent so far."""
    await _record(upstreams, proxies, redis_url, 30)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.json_response({})

    candidate = await upstreams(slow)
    process = _replay(redis_url, candidate.url, "--last", "30", "--rate", "10")
    await eventually(lambda: len(candidate.requests) >= 3, within=30)
    process.send_signal(signal.SIGINT)
    stdout, _ = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0
    assert "replay stopped" in stdout and "of 30 sent" in stdout
    sent = int(stdout.split("): ")[1].split(" of ")[0])
    assert 3 <= sent < 30


async def test_replay_to_a_named_candidate_is_shaped_for_it(upstreams, proxies, redis_url, tmp_path) -> None:
    """--to NAME picks one of several configured candidates, and its model shaping applies."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": redis_url})
    async with aiohttp.ClientSession() as client:
        for i in range(4):
            body = orjson.dumps({"model": "gpt-4o-mini", "n": i})
            async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=body) as resp:
                await resp.read()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 4)
    first, second = await upstreams(echo), await upstreams(echo)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[[candidate]]\nname = "one"\nurl = "{first.url}"\n'
        f'[[candidate]]\nname = "two"\nurl = "{second.url}"\nmodel = "two-model"\n'
    )
    process = _replay(redis_url, "", "--config", str(config), "--to", "two", "--last", "4", "--rate", "200")
    stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, stderr
    assert first.requests == [] and len(second.requests) == 4
    assert sorted(orjson.loads(r["body"])["model"] for r in second.requests) == ["two-model"] * 4

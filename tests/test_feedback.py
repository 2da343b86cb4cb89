"""The feedback endpoint: only whoever received an answer may score it, and a body is read whole."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from proxy.server import ProxyServer

from .conftest import echo, eventually

FEEDBACK = "/_shadow/feedback"


def _canary(**overrides: Any) -> dict[str, Any]:
    """A canary holding all users on the incumbent (feedback is on while a canary is)."""
    stage = {"weight": 0.0, "min_duration": 3600, "min_pairs": 100_000, "gates": ["error_rate"]}
    return {"enabled": True, "stage": [stage], **overrides}


async def _proxy(upstreams, proxies, redis_url: str, **canary: Any) -> ProxyServer:  # type: ignore[no-untyped-def]
    incumbent = await upstreams(echo)
    proxy: ProxyServer = await proxies(
        incumbent={"url": incumbent.url}, record={"redis_url": redis_url}, canary=_canary(**canary)
    )
    return proxy


async def _answered(proxy: ProxyServer, n: int = 1) -> list[tuple[str, str]]:
    """n requests through the proxy, recorded; their (x-request-id, x-feedback-token)."""
    out = []
    async with aiohttp.ClientSession() as client:
        for _ in range(n):
            async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
                assert resp.status == 200
                out.append((resp.headers["x-request-id"], resp.headers["x-feedback-token"]))
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") >= n)
    return out


async def _post(proxy: ProxyServer, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}{FEEDBACK}", json=body, headers=headers) as resp:
            return resp.status, await resp.json()


def _refused(proxy: ProxyServer, result: str) -> float:
    return proxy.runtime.metrics.value("shadow_proxy_feedback_total", arm="-", result=result)


async def test_feedback_with_the_answers_token_is_stored(upstreams, proxies, redis_url) -> None:
    """The token of the answer, in the body or in the x-feedback-token header, lets its receiver score it."""
    proxy = await _proxy(upstreams, proxies, redis_url)
    (first, first_token), (second, second_token) = await _answered(proxy, 2)
    assert len(first_token.split(".")[1]) == 22 and first_token != second_token
    status, body = await _post(proxy, {"request_id": first, "score": 1, "token": first_token})
    assert (status, body) == (200, {"request_id": first, "arm": "incumbent"})
    status, body = await _post(proxy, {"request_id": second, "label": "good"}, {"x-feedback-token": second_token})
    assert status == 200 and body["arm"] == "incumbent"


async def test_feedback_without_or_with_a_forged_token_is_403(upstreams, proxies, redis_url) -> None:
    """A missing token, another request's token with its record id swapped, and made-up ones are refused
    with 403 and counted by reason."""
    proxy = await _proxy(upstreams, proxies, redis_url)
    (mine, mine_token), (other, other_token) = await _answered(proxy, 2)
    status, body = await _post(proxy, {"request_id": mine, "score": 0})
    assert status == 403 and body["error"]["type"] == "feedback_token_missing"
    swapped = mine_token.split(".")[0] + "." + other_token.split(".")[1]
    for forged in (swapped, "A" * 22, ""):
        status, body = await _post(proxy, {"request_id": mine, "score": 0}, {"x-feedback-token": forged or "x"})
        assert status == 403 and body["error"]["type"] == "feedback_token_invalid", forged
    assert _refused(proxy, "token_missing") == 1 and _refused(proxy, "token_invalid") == 3
    # The refused attempts stored nothing: the rightful receiver can still score it.
    status, _ = await _post(proxy, {"request_id": other, "score": 1, "token": other_token})
    assert status == 200


async def test_reusing_someone_elses_request_id_gives_a_token_for_ones_own_request_only(
    upstreams, proxies, redis_url
) -> None:
    """The token names the proxy's own record id: a client that sends another user's x-request-id gets a
    token that scores its own request, and the other user's feedback is still accepted."""
    proxy = await _proxy(upstreams, proxies, redis_url)
    (victim, victim_token), *_ = await _answered(proxy)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{proxy.port}/v1/x", json={}, headers={"x-request-id": victim}) as resp,
    ):
        await resp.read()
        attacker_token = resp.headers["x-feedback-token"]
    assert attacker_token != victim_token
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 2)
    assert (await _post(proxy, {"request_id": victim, "score": 0, "token": attacker_token}))[0] == 200
    assert (await _post(proxy, {"request_id": victim, "score": 1, "token": victim_token}))[0] == 200


async def test_replicas_sharing_the_secret_accept_each_others_tokens(upstreams, proxies, redis_url) -> None:
    """With canary.feedback_secret set, a token from one replica is good at another; without it, not."""
    shared = [await _proxy(upstreams, proxies, redis_url, feedback_secret="${file:/dev/null}shared") for _ in "ab"]
    (request_id, token), *_ = await _answered(shared[0])
    assert (await _post(shared[1], {"request_id": request_id, "score": 1, "token": token}))[0] == 200
    alone = [await _proxy(upstreams, proxies, redis_url) for _ in "ab"]
    (request_id, token), *_ = await _answered(alone[0])
    assert (await _post(alone[1], {"request_id": request_id, "score": 1, "token": token}))[0] == 403


async def test_a_body_in_two_tcp_writes_is_read_whole(upstreams, proxies, redis_url) -> None:
    """A feedback body whose second half arrives 200 ms after the first is accepted, not refused as bad JSON."""
    proxy = await _proxy(upstreams, proxies, redis_url)
    ((request_id, token),) = await _answered(proxy)
    body = orjson.dumps({"request_id": request_id, "score": 0.5, "token": token})
    head = f"POST {FEEDBACK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body[:20])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body[20:])
        await writer.drain()
        status_line = await reader.readline()
        answer = await reader.read()
    finally:
        writer.close()
    assert status_line.split()[1] == b"200", answer
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"request_id": request_id, "arm": "incumbent"}


async def test_a_body_over_16_kib_is_413(upstreams, proxies, redis_url) -> None:
    """A body beyond MAX_BODY, announced or chunked, is refused with 413."""
    proxy = await _proxy(upstreams, proxies, redis_url)
    big = b'{"request_id": "' + b"x" * 17_000 + b'"}'

    async def chunks() -> Any:
        yield big[:9000]
        yield big[9000:]

    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{proxy.port}{FEEDBACK}"
        async with client.post(url, data=big) as resp:
            assert resp.status == 413
        async with client.post(url, data=chunks()) as resp:
            assert resp.status == 413


async def test_no_header_names_the_serving_arm_by_default(upstreams, proxies, redis_url) -> None:
    """With canary.served_by_header unset, answers say nothing of which arm served (only the token)."""
    proxy = await _proxy(upstreams, proxies, redis_url)
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
            assert resp.status == 200 and "x-feedback-token" in resp.headers
            assert not {name.lower() for name in resp.headers} & {"x-served-by", "x-shadow-arm"}
            assert b"incumbent" not in b"".join(f"{k}: {v}".encode() for k, v in resp.headers.items())


async def test_no_feedback_token_when_feedback_is_off(upstreams, proxies, redis_url) -> None:
    """Without a canary there is no feedback endpoint and answers carry no token."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": redis_url})
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
            assert resp.status == 200 and "x-feedback-token" not in resp.headers

"""The live path over real sockets: what a client sends reaches the incumbent, and what it answers comes back."""

from __future__ import annotations

import asyncio
import gzip

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from .conftest import echo, eventually


async def _raw_request(port: int, data: bytes) -> bytes:
    """Send bytes on a fresh connection and read the whole answer (Connection: close expected)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_and_body_reaches_the_incumbent(upstreams, proxies, method: str) -> None:
    """Method and body arrive unchanged, and the incumbent's answer comes back."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.request(method, f"http://127.0.0.1:{proxy.port}/v1/x", data=b"payload") as resp:
            assert resp.status == 200
            assert await resp.json() == {"method": method, "path": "/v1/x", "bytes": 7}
    assert incumbent.requests[0]["body"] == b"payload"


async def test_path_and_query_pass_byte_for_byte(upstreams, proxies) -> None:
    """Percent-encoding, repeated parameters and odd characters are not re-encoded."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    target = "/v1/a%2Fb/c%20d?x=1&x=2&y=%41%zz&z=a+b&empty=&flag"
    async with aiohttp.ClientSession() as client:
        async with client.get(URL(f"http://127.0.0.1:{proxy.port}{target}", encoded=True)) as resp:
            assert resp.status == 200
    assert incumbent.requests[0]["raw_path"] == target


async def test_incumbent_url_path_prefix_is_kept(upstreams, proxies) -> None:
    """An incumbent URL with a base path receives the request under that prefix."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url + "/base/"}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/v1/models?a=1") as resp:
            assert resp.status == 200
    assert incumbent.requests[0]["raw_path"] == "/base/v1/models?a=1"


async def test_oversized_body_is_refused_with_413_json(upstreams, proxies) -> None:
    """A body over limits.max_body_bytes gets 413 with a JSON error; nothing is forwarded or mirrored."""
    incumbent = await upstreams(echo)
    candidate = await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        limits={"max_body_bytes": 1024},
        record={"enabled": False},
    )
    async with aiohttp.ClientSession() as client:
        for data in (b"x" * 1025, _chunks(b"y" * 2000)):
            async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=data) as resp:
                assert resp.status == 413
                body = await resp.json()
                assert body["error"]["type"] == "request_too_large"
                assert body["error"]["request_id"] == resp.headers["x-request-id"]
    assert incumbent.requests == [] and candidate.requests == []
    assert proxy.runtime.metrics.value("shadow_proxy_requests_rejected_total", reason="body_too_large") == 2


async def _chunks(data: bytes):  # type: ignore[no-untyped-def]
    for i in range(0, len(data), 100):
        yield data[i : i + 100]


async def test_chunked_request_body_is_forwarded_whole(upstreams, proxies) -> None:
    """A chunked upload is read completely and forwarded with its length."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/up", data=_chunks(b"z" * 1000)) as resp:
            assert (await resp.json())["bytes"] == 1000
    assert incumbent.requests[0]["body"] == b"z" * 1000
    assert dict(incumbent.requests[0]["headers"])["Content-Length"] == "1000"


async def test_expect_continue_is_answered_and_oversize_refused_before_upload(upstreams, proxies) -> None:
    """Expect: 100-continue gets 100 then the answer; an announced oversize body gets 413 without 100."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, limits={"max_body_bytes": 1024}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/x", data=b"abc", expect100=True) as resp:
            assert resp.status == 200 and (await resp.json())["bytes"] == 3
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    answer = await _raw_request(proxy.port, head)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in answer
    assert b'"request_too_large"' in answer


async def test_responses_stream_chunk_by_chunk(upstreams, proxies) -> None:
    """Each SSE event reaches the client before the incumbent has produced the next one."""
    client_got_first = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await asyncio.wait_for(client_got_first.wait(), 10)
        await resp.write(b"data: two\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    incumbent = await upstreams(sse)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            first = await resp.content.readuntil(b"\n\n")
            assert first == b"data: one\n\n"
            client_got_first.set()
            rest = await resp.content.read()
    assert rest == b"data: two\n\ndata: [DONE]\n\n"


async def test_response_head_reaches_the_client_before_the_first_chunk_exists(upstreams, proxies) -> None:
    """The status and headers are relayed as they arrive, not held until the body starts."""
    client_got_head = asyncio.Event()

    async def slow_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.wait_for(client_got_head.wait(), 10)
        await resp.write(b"data: one\n\n")
        return resp

    incumbent = await upstreams(slow_body)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            client_got_head.set()
            assert await resp.content.read() == b"data: one\n\n"


async def test_hop_by_hop_headers_are_stripped_both_ways(upstreams, proxies) -> None:
    """Headers named in Connection and the hop-by-hop set neither reach the incumbent nor come back."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1", "Keep-Alive": "timeout=5", "X-End": "e"},
        )

    incumbent = await upstreams(handler)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    request = (
        b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close, X-Client-Hop\r\nX-Client-Hop: 1\r\n"
        b"Keep-Alive: timeout=1\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Keep: k\r\n\r\n"
    )
    answer = (await _raw_request(proxy.port, request)).decode().lower()
    sent = {k.lower() for k, _ in incumbent.requests[0]["headers"]}
    assert "x-client-hop" not in sent and "te" not in sent and "proxy-authorization" not in sent
    assert "x-keep" in sent
    assert "x-upstream-hop" not in answer and "keep-alive: timeout=5" not in answer
    assert "x-end: e" in answer


async def test_forwarding_headers_via_and_request_id(upstreams, proxies) -> None:
    """X-Forwarded-* and Via are added, the client's request id reaches both arms and comes back."""
    incumbent = await upstreams(echo)
    candidate = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        headers = {"X-Request-Id": "rid-42", "X-Forwarded-For": "203.0.113.9"}
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}", headers=headers) as resp:
            assert resp.headers["x-request-id"] == "rid-42"
            assert resp.headers["Via"] == "1.1 shadow-proxy"
        await eventually(lambda: len(candidate.requests) == 1)
        for arm in (incumbent, candidate):
            sent = dict((k.lower(), v) for k, v in arm.requests[0]["headers"])
            assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
            assert sent["x-forwarded-proto"] == "http"
            assert sent["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"
            assert sent["via"] == "1.1 shadow-proxy"
            assert sent["x-request-id"] == "rid-42"
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
            generated = resp.headers["x-request-id"]
        await eventually(lambda: len(candidate.requests) == 2)
    assert len(generated) == 32
    for arm in (incumbent, candidate):
        assert dict((k.lower(), v) for k, v in arm.requests[1]["headers"])["x-request-id"] == generated


async def test_repeated_request_headers_are_all_forwarded(upstreams, proxies) -> None:
    """Several headers of one name arrive as several headers, in order."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        headers = [("X-Tag", "a"), ("X-Tag", "b"), ("X-Tag", "c")]
        async with client.get(f"http://127.0.0.1:{proxy.port}/x", headers=headers) as resp:
            assert resp.status == 200
    assert [v for k, v in incumbent.requests[0]["headers"] if k == "X-Tag"] == ["a", "b", "c"]


async def test_content_encoding_passes_through_compressed(upstreams, proxies) -> None:
    """A gzip body from the incumbent reaches the client byte for byte, still compressed."""
    payload = gzip.compress(b'{"answer": 42}' * 100)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    incumbent = await upstreams(handler)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/x", headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert await resp.read() == payload
    assert dict(incumbent.requests[0]["headers"])["Accept-Encoding"] == "gzip"


async def test_no_accept_encoding_or_user_agent_is_invented(upstreams, proxies) -> None:
    """The proxy's HTTP client adds no Accept-Encoding, User-Agent or Content-Type of its own."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    request = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    await _raw_request(proxy.port, request)
    sent = {k.lower() for k, _ in incumbent.requests[0]["headers"]}
    assert not sent & {"accept-encoding", "user-agent", "content-type"}


async def test_several_set_cookie_headers_are_preserved(upstreams, proxies) -> None:
    """Each Set-Cookie from the incumbent reaches the client separately."""

    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; HttpOnly")
        return resp

    incumbent = await upstreams(handler)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/x") as resp:
            assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
        # The proxy keeps no cookie jar: a second request carries no cookie the client did not send.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain:
            async with plain.get(f"http://127.0.0.1:{proxy.port}/x"):
                pass
    assert "Cookie" not in dict(incumbent.requests[1]["headers"])


async def test_redirects_are_passed_through_not_followed(upstreams, proxies) -> None:
    """A 302 from the incumbent reaches the client with its Location."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    incumbent = await upstreams(handler)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/x", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/elsewhere"
    assert len(incumbent.requests) == 1


async def test_head_keeps_length_and_sends_no_body(upstreams, proxies) -> None:
    """HEAD answers carry the incumbent's Content-Length and no body; the connection stays usable."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"0123456789")

    incumbent = await upstreams(handler)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.head(f"http://127.0.0.1:{proxy.port}/x") as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == "10"
            assert await resp.read() == b""
        async with client.get(f"http://127.0.0.1:{proxy.port}/x") as resp:
            assert await resp.read() == b"0123456789"


async def test_incumbent_refusing_gives_502_json(proxies) -> None:
    """A refused connection becomes 502 with a JSON error and a counter."""
    from proxy.tools.embedded_redis import free_port

    proxy = await proxies(incumbent={"url": f"http://127.0.0.1:{free_port()}"}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/x") as resp:
            assert resp.status == 502
            body = await resp.json()
    assert body["error"]["type"] == "connect_error" and body["error"]["code"] == 502
    metrics = proxy.runtime.metrics
    assert (
        metrics.value("shadow_proxy_upstream_errors_total", upstream="incumbent", role="live", error="connect_error")
        == 1
    )
    assert metrics.value("shadow_proxy_requests_total", upstream="incumbent", route="/*", code="502") == 1


async def test_incumbent_timeout_gives_504_json(upstreams, proxies) -> None:
    """An incumbent silent past read_timeout becomes 504 with a JSON error and a counter."""
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    incumbent = await upstreams(hang)
    proxy = await proxies(incumbent={"url": incumbent.url, "read_timeout": 0.2}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/x") as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["type"] == "read_timeout"
    release.set()
    metrics = proxy.runtime.metrics
    assert (
        metrics.value("shadow_proxy_upstream_errors_total", upstream="incumbent", role="live", error="read_timeout")
        == 1
    )


async def test_incumbent_failing_mid_stream_cuts_the_client_connection(upstreams, proxies) -> None:
    """When the incumbent dies after the headers, the client sees a broken body, not a clean end."""

    async def dies(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        assert request.transport is not None
        request.transport.abort()
        return resp

    incumbent = await upstreams(dies)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/x") as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    assert (
        proxy.runtime.metrics.value(
            "shadow_proxy_upstream_errors_total", upstream="incumbent", role="live", error="payload_error"
        )
        == 1
    )


async def test_keep_alive_connections_to_the_incumbent_are_reused(upstreams, proxies) -> None:
    """Sequential requests through the proxy reuse one pooled connection to the incumbent."""
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(text="ok")

    incumbent = await upstreams(handler)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        for _ in range(10):
            async with client.get(f"http://127.0.0.1:{proxy.port}/x") as resp:
                await resp.read()
    assert len(peers) == 1


async def test_absolute_form_request_line_is_forwarded_with_path_and_query(upstreams, proxies) -> None:
    """`GET http://host:port/v1/x?a=1 HTTP/1.1` (what a client configured to use a proxy sends) reaches the
    incumbent as /v1/x?a=1, not a 500."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"enabled": False})
    authority = incumbent.url.removeprefix("http://")
    answer = await _raw_request(
        proxy.port,
        f"GET {incumbent.url}/v1/x?a=1&b=%2F HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert incumbent.requests[0]["raw_path"] == "/v1/x?a=1&b=%2F"


async def test_a_response_without_content_type_gets_none_added(proxies) -> None:
    """aiohttp would add `application/octet-stream`; the client sees the upstream's headers, without a type."""

    async def untyped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(untyped, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        proxy = await proxies(incumbent={"url": f"http://127.0.0.1:{port}"}, record={"enabled": False})
        answer = await _raw_request(proxy.port, b"GET /v1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello"
    assert b"content-type" not in head.lower()

"""The admin listener: liveness, readiness with upstream and Redis status, Prometheus metrics, who sees records."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.comparator.worker import Worker
from proxy.server import ProxyServer
from proxy.tools.embedded_redis import free_port

from .conftest import echo, eventually, make_config


async def test_healthz_and_readyz_report_ready(upstreams, proxies, redis_url) -> None:
    """With incumbent, candidate and Redis up, /readyz is 200 and says so per check."""
    incumbent = await upstreams(echo)
    candidate = await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"redis_url": redis_url}
    )
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/healthz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "incumbent": True,
        "candidate:candidate": True,
        "redis": True,
    }


async def test_readyz_is_503_when_incumbent_is_down_but_not_for_redis(upstreams, proxies) -> None:
    """The incumbent decides readiness; a down Redis or candidate is reported without failing it."""
    incumbent = await upstreams(echo)
    dead = f"http://127.0.0.1:{free_port()}"
    degraded = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": dead},
        record={"redis_url": f"redis://127.0.0.1:{free_port()}/0"},
    )
    unready = await proxies(incumbent={"url": dead}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{degraded.admin_port}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["checks"]["redis"]["ok"] is False and body["checks"]["candidate:candidate"]["ok"] is False
        async with client.get(f"http://127.0.0.1:{unready.admin_port}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"]["incumbent"] == {"ok": False, "detail": "connect_error"}


async def test_readyz_health_path_is_used_when_configured(upstreams, proxies) -> None:
    """incumbent.health_path is probed with GET."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url, "health_path": "/health"}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
            assert (await resp.json())["checks"]["incumbent"] == {"ok": True, "detail": "HTTP 200"}
    assert incumbent.requests[0]["raw_path"] == "/health"


async def test_metrics_are_prometheus_text(upstreams, proxies) -> None:
    """/metrics serves the text exposition format with the proxy's counters."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, candidate={"url": incumbent.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{proxy.port}/x"):
            pass
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics", headers=headers) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).endswith("# EOF\n")
    assert 'shadow_proxy_requests_total{code="200",route="/*",upstream="incumbent"} 1.0' in text
    assert 'shadow_proxy_mirrors_skipped_total{reason="route_not_mirrored",target="candidate"} 1.0' in text


async def test_reports_are_built_in_a_child_process_and_cached(upstreams, proxies, redis_url) -> None:
    """/api/report never runs the statistics on the proxy's event loop, and a poll within the cache age
    is answered from the last report."""
    import multiprocessing

    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": redis_url})
    before = {p.pid for p in multiprocessing.active_children()}
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{proxy.admin_port}/api/report?since=1h"
        async with client.get(url) as resp:
            first = await resp.json()
        async with client.get(url) as resp:
            second = await resp.json()
    assert first["generated_at"] == second["generated_at"]
    children = {p.pid for p in multiprocessing.active_children()} - before
    assert len(children) == 1, "the report was not built in a child process"


SECRET = "the-users-private-prompt"


async def _told(request: web.Request) -> web.Response:
    """A candidate that differs from echo and repeats the prompt, as a model's answer would."""
    body = await request.read()
    return web.json_response({"answer": body.decode()})


async def _recorded(upstreams, proxies, redis_url: str, **admin: str) -> ProxyServer:  # type: ignore[no-untyped-def]
    """A proxy whose report has examples: 5 requests with SECRET in them, compared by a burst worker."""
    incumbent, candidate = await upstreams(echo), await upstreams(_told)
    sections: dict[str, Any] = {"record": {"redis_url": redis_url}, "compare": {"window_seconds": 1}}
    proxy: ProxyServer = await proxies(
        incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, admin=admin, **sections
    )
    async with aiohttp.ClientSession() as client:
        for i in range(5):
            body = orjson.dumps({"model": "m", "prompt": f"{SECRET} {i}"})
            async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=body) as resp:
                assert resp.status == 200
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 5)
    worker = Worker(make_config(**sections), redis_url)
    await worker.run(burst=True)
    await worker.close()
    return proxy


async def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as client, client.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_report_examples_need_the_admin_token(upstreams, proxies, redis_url) -> None:
    """Without a token the report has no examples (and says so), a wrong one is 403, the right one shows them."""
    proxy = await _recorded(upstreams, proxies, redis_url, token="s3cret")
    url = f"http://127.0.0.1:{proxy.admin_port}/api/report?since=1h"
    status, text = await _get(url)
    report = orjson.loads(text)
    assert status == 200 and report["summary"]["pairs"] == 5
    assert report["examples_withheld"] is True and report["examples"] == []
    assert all(gate["examples"] == [] for gate in report["verdict"]["gates"])
    assert SECRET not in text
    assert (await _get(url, "wrong"))[0] == 403
    status, text = await _get(url, "s3cret")
    report = orjson.loads(text)
    assert status == 200 and report["examples_withheld"] is False
    assert len(report["examples"]) == 5 and SECRET in text


async def test_a_loopback_listener_without_a_token_shows_examples(upstreams, proxies, redis_url) -> None:
    """With no admin.token, a listener on loopback serves the examples to anyone who can reach it."""
    proxy = await _recorded(upstreams, proxies, redis_url)
    status, text = await _get(f"http://127.0.0.1:{proxy.admin_port}/api/report?since=1h")
    assert status == 200 and orjson.loads(text)["examples_withheld"] is False and SECRET in text


async def test_a_listener_on_every_interface_without_a_token_withholds_examples(upstreams, proxies, redis_url) -> None:
    """A server started around the config check (0.0.0.0, no token) still never serves recorded content."""
    proxy = await _recorded(upstreams, proxies, redis_url, listen="0.0.0.0:0")
    status, text = await _get(f"http://127.0.0.1:{proxy.admin_port}/api/report?since=1h", "anything")
    assert status == 200 and orjson.loads(text)["examples_withheld"] is True and SECRET not in text


async def test_open_endpoints_hold_no_recorded_content(upstreams, proxies, redis_url) -> None:
    """/healthz, /readyz, /metrics, /api/canary and the verdict answer without a token and never show a prompt."""
    proxy = await _recorded(upstreams, proxies, redis_url, token="s3cret")
    base = f"http://127.0.0.1:{proxy.admin_port}"
    for path in ("/healthz", "/readyz", "/metrics", "/api/canary", "/api/canary/verdict", "/"):
        status, text = await _get(base + path)
        assert status == 200, path
        assert SECRET not in text, path

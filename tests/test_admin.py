"""The admin listener: liveness, readiness with upstream and Redis status, Prometheus metrics."""

from __future__ import annotations

import aiohttp

from proxy.tools.embedded_redis import free_port

from .conftest import echo


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

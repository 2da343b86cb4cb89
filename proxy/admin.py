"""The admin listener: liveness, readiness (upstreams and Redis) and Prometheus metrics."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from .runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its event loop answer."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while the incumbent is reachable; Redis and candidate state are reported.

    Redis or candidate trouble does not make the proxy unready: the live path keeps serving
    without them (records wait in the bounded queue, mirrors fail and are counted).
    """
    runtime = request.app[RUNTIME]
    if runtime.shutting_down:
        return _json({"status": "shutting_down"}, status=503)
    timeout = runtime.config.admin.health_check_timeout
    probes = {"incumbent": runtime.incumbent.probe(timeout)}
    if runtime.candidate is not None:
        probes["candidate"] = runtime.candidate.probe(timeout)
    if runtime.store is not None:
        probes["redis"] = runtime.store.ping()
    results = await asyncio.gather(*probes.values())
    checks = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in zip(probes, results, strict=True)}
    ready = checks["incumbent"]["ok"]
    body = {
        "status": "ready" if ready else "unready",
        "checks": checks,
        "mirrors_in_flight": runtime.shadow.in_flight if runtime.shadow is not None else 0,
        "record_queue": runtime.recorder.depth if runtime.recorder is not None else 0,
    }
    return _json(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition, in the format the scraper asks for (text or OpenMetrics)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[RUNTIME].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app

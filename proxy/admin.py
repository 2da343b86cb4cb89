"""The admin listener: liveness, readiness (upstreams and Redis) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder
from redis.exceptions import RedisError

from .comparator.service import report_from
from .comparator.store import AggregateReader
from .config import parse_duration
from .runtime import Runtime
from .store import Keys

RUNTIME = web.AppKey("runtime", Runtime)


@dataclass(slots=True)
class ReportSource:
    """The aggregate reader of the admin listener (None when recording is off)."""

    reader: AggregateReader | None


READER = web.AppKey("reader", ReportSource)


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


async def report(request: web.Request) -> web.Response:
    """The comparator's report as JSON (``?since=15m&route=...&model=...``), as `shadow-proxy report --json`."""
    runtime = request.app[RUNTIME]
    reader = request.app[READER].reader
    if reader is None:
        return _json({"error": {"message": "recording is disabled: no report", "type": "not_available"}}, 404)
    try:
        since = parse_duration(request.query.get("since", runtime.config.compare.report_since))
    except ValueError as exc:
        return _json({"error": {"message": str(exc), "type": "bad_request"}}, 400)
    filters = {key: request.query[key] for key in ("route", "model") if key in request.query}
    try:
        body = await report_from(reader, runtime.config, since_seconds=since, segment_filter=filters)
    except (RedisError, OSError) as exc:
        return _json({"error": {"message": f"Redis unavailable: {exc}", "type": "redis_unavailable"}}, 503)
    return _json(body)


async def _reader_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    record = runtime.config.record
    reader = None
    if record.enabled and record.redis_url:
        reader = AggregateReader(
            record.redis_url, Keys(record.namespace, record.stream), socket_timeout=record.socket_timeout
        )
    app[READER] = ReportSource(reader)
    yield
    if reader is not None:
        await reader.close()


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.cleanup_ctx.append(_reader_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/report", report)
    return app

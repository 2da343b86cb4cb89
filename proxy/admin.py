"""The admin listener: liveness, readiness (upstreams and Redis) and Prometheus metrics.

Recorded content (the report's examples: prompts, answers and their request ids) is served only to a
request bearing ``admin.token``, or to anyone when no token is set and the listener is on loopback
(serve refuses a non-loopback listener without a token). Otherwise the report comes without it and
says so (``examples_withheld``). /healthz, /readyz and /metrics hold no recorded content and stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from . import dashboard
from .canary.controller import Controller
from .comparator.report_loader import report_from
from .comparator.verdict import overall_outcome
from .config import on_loopback, parse_duration
from .exposition import redis_families, registry_for_scrape
from .redis import AggregateReader, Keys, StoreUnavailable
from .wiring import Runtime

RUNTIME = web.AppKey("runtime", Runtime)


@dataclass(slots=True)
class ReportSource:
    """The aggregate reader of the admin listener (None when recording is off) and its last report."""

    reader: AggregateReader | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    cache: dict[Any, tuple[float, Any]] = field(default_factory=dict)


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
    for candidate in runtime.candidates:
        probes[f"candidate:{candidate.name}"] = candidate.probe(timeout)
    if runtime.writer is not None:
        probes["redis"] = runtime.writer.ping()
    results = await asyncio.gather(*probes.values())
    checks = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in zip(probes, results, strict=True)}
    ready = checks["incumbent"]["ok"]
    body = {
        "status": "ready" if ready else "unready",
        "checks": checks,
        "mirrors_in_flight": sum(d.in_flight for d in runtime.dispatchers()),
        "mirrors_in_flight_by_target": {d.target: d.in_flight for d in runtime.dispatchers()},
        "record_queue": runtime.recorder.depth if runtime.recorder is not None else 0,
        # Background loops: which one is failing (Redis unavailable) or was restarted, and since when.
        "loops": runtime.supervisor.status(),
    }
    return _json(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (text or OpenMetrics, as the scraper asks): all workers' metrics plus
    the comparator and verdict state read from Redis at scrape time."""
    runtime = request.app[RUNTIME]
    reader = request.app[READER].reader
    snapshot = await redis_families(reader, runtime.config.compare.group) if reader is not None else []
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(registry_for_scrape(runtime.metrics, snapshot))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def report(request: web.Request) -> web.Response:
    """The comparator's report as JSON (``?since=15m&route=...&model=...&candidate=NAME``), as
    `shadow-proxy report --json`."""
    runtime = request.app[RUNTIME]
    reader = request.app[READER].reader
    if reader is None:
        return _json({"error": {"message": "recording is disabled: no report", "type": "not_available"}}, 404)
    allowed = _may_read_records(request)
    if allowed is None:
        return _json({"error": {"message": "wrong admin token", "type": "forbidden"}}, 403)
    try:
        since = parse_duration(request.query.get("since", runtime.config.compare.report_since))
    except ValueError as exc:
        return _json({"error": {"message": str(exc), "type": "bad_request"}}, 400)
    filters = {key: request.query[key] for key in ("route", "model") if key in request.query}
    candidate = request.query.get("candidate") or None
    source = request.app[READER]
    key = (since, tuple(sorted(filters.items())), candidate)
    async with source.lock:
        # A dashboard polls every few seconds: serve a recent report rather than rebuild it each time.
        cached = source.cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < runtime.config.admin.report_cache_seconds:
            report_ = cached[1]
        else:
            try:
                report_ = await report_from(
                    reader,
                    runtime.config,
                    since_seconds=since,
                    segment_filter=filters,
                    builder=runtime.reports,
                    candidate=candidate,
                )
            except StoreUnavailable as exc:
                return _json({"error": {"message": f"Redis unavailable: {exc}", "type": "redis_unavailable"}}, 503)
            source.cache = {key: (time.monotonic(), report_)}
    known = {c.name for c in runtime.config.candidate} | {c.name for c in report_.candidates}
    if candidate is not None and candidate not in known:
        message = (
            f"no candidate named {candidate!r}: configured or seen in range are {', '.join(sorted(known)) or 'none'}"
        )
        return _json({"error": {"message": message, "type": "unknown_candidate"}}, 404)
    body = report_.as_json()
    if not allowed:
        body["examples"] = []
        for gates in [body["verdict"]["gates"], *(segment["gates"] for segment in body["segments"])]:
            _withhold(gates)
    body["examples_withheld"] = not allowed
    return _json(body)


def _withhold(gates: list[dict[str, Any]]) -> None:
    """Drops the request ids a gate's examples name."""
    for gate in gates:
        gate["examples"] = []


def _may_read_records(request: web.Request) -> bool | None:
    """May this request see recorded content? True, False (no token sent: withhold it) or None (a wrong one)."""
    admin = request.app[RUNTIME].config.admin
    expected = admin.token.get_secret_value()
    if not expected:
        return on_loopback(admin.listen)
    given = request.headers.get("Authorization")
    if given is None:
        return False
    return _token_matches(given, expected) or None


def _token_matches(header: str, expected: str) -> bool:
    return header.startswith("Bearer ") and hmac.compare_digest(
        header.removeprefix("Bearer ").encode(), expected.encode()
    )


def _authorised(request: web.Request) -> web.Response | None:
    """Bearer-token check for mutations: 401 without a token, 403 with a wrong one (or none configured)."""
    expected = request.app[RUNTIME].config.admin.token.get_secret_value()
    given = request.headers.get("Authorization", "")
    if not expected:
        return _json({"error": {"message": "mutations are disabled: set admin.token", "type": "forbidden"}}, 403)
    if not given.startswith("Bearer "):
        response = _json(
            {"error": {"message": "send Authorization: Bearer <admin.token>", "type": "unauthorized"}}, 401
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="shadow-proxy admin"'
        return response
    if not _token_matches(given, expected):
        return _json({"error": {"message": "wrong admin token", "type": "forbidden"}}, 403)
    return None


def _controller(request: web.Request) -> Controller | None:
    canary = request.app[RUNTIME].canary
    return None if canary is None else canary.controller


async def canary_status(request: web.Request) -> web.Response:
    """State, weight, stage and its gates with their current values over the stage's window, history."""
    controller = _controller(request)
    if controller is None:
        return _json({"error": {"message": "recording is disabled: no canary", "type": "not_available"}}, 404)
    runtime = request.app[RUNTIME]
    try:
        state = await controller.current()
        _, pairs, evidence = await controller.evidence(state, time.time())
        history = await controller.store.events(int(request.query.get("history", "50")))
        holder = await controller.store.lease_holder()
    except StoreUnavailable as exc:
        return _json({"error": {"message": f"Redis unavailable: {exc}", "type": "redis_unavailable"}}, 503)
    stages = [s.model_dump() for s in runtime.config.canary.stage]
    return _json(
        {
            "enabled": runtime.config.canary.enabled,
            "state": state.as_dict(),
            "stage": stages[min(state.stage, len(stages) - 1)],
            "stages": stages,
            "evidence": evidence,
            "lease_holder": holder,
            "history": history,
        }
    )


async def canary_action(request: web.Request) -> web.Response:
    """POST /api/canary/{promote,rollback,pause,resume,set-weight} with a bearer token."""
    refused = _authorised(request)
    if refused is not None:
        return refused
    controller = _controller(request)
    if controller is None:
        return _json({"error": {"message": "recording is disabled: no canary", "type": "not_available"}}, 404)
    action = request.match_info["action"]
    try:
        body = orjson.loads(await request.read() or b"{}")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        weight = body.get("weight")
        transition = await controller.act(
            action,
            actor=str(body.get("actor") or "admin-api"),
            reason=str(body.get("reason") or "manual"),
            weight=None if weight is None else float(weight),
        )
    except (ValueError, orjson.JSONDecodeError) as exc:
        return _json({"error": {"message": str(exc), "type": "invalid_action"}}, 400)
    except StoreUnavailable as exc:
        return _json({"error": {"message": f"Redis unavailable: {exc}", "type": "redis_unavailable"}}, 503)
    return _json({"state": transition.after.as_dict(), "event": transition.event()})


RESULT = {"pass": 1.0, "inconclusive": 0.5, "fail": 0.0}


async def canary_verdict(request: web.Request) -> web.Response:
    """The verdict as one number (result: 1 pass, 0.5 inconclusive, 0 fail) for Argo Rollouts / Flagger.

    Over the current canary stage's window when a canary is active, else over ``?since=`` (default
    compare.report_since). ``?format=text`` answers the bare number.
    """
    runtime = request.app[RUNTIME]
    controller = _controller(request)
    if controller is None:
        return _json({"error": {"message": "recording is disabled: no verdict", "type": "not_available"}}, 404)
    now = time.time()
    try:
        state = await controller.current()
        since = now - parse_duration(request.query["since"]) if "since" in request.query else None
        if since is None:
            active = runtime.config.canary.enabled and state.status == "active"
            since = state.stage_started if active else now - parse_duration(runtime.config.compare.report_since)
        outcomes, pairs, evidence = await controller.evidence(replace(state, stage_started=since), now)
    except ValueError as exc:
        return _json({"error": {"message": str(exc), "type": "bad_request"}}, 400)
    except StoreUnavailable as exc:
        return _json({"error": {"message": f"Redis unavailable: {exc}", "type": "redis_unavailable"}}, 503)
    verdict = overall_outcome(list(outcomes.values()))
    if request.query.get("format") == "text":
        return web.Response(text=f"{RESULT[verdict]:g}\n")
    if request.query.get("format") == "prometheus":
        # Scraped as a Prometheus target, so Flagger's prometheus provider can gate on it.
        lines = [
            "# HELP shadow_proxy_verdict_result Comparator verdict: 1 pass, 0.5 inconclusive, 0 fail.",
            "# TYPE shadow_proxy_verdict_result gauge",
            f"shadow_proxy_verdict_result {RESULT[verdict]:g}",
            "# HELP shadow_proxy_verdict_pairs Pairs behind the verdict.",
            "# TYPE shadow_proxy_verdict_pairs gauge",
            f"shadow_proxy_verdict_pairs {pairs}",
        ]
        return web.Response(text="\n".join(lines) + "\n", headers={"Content-Type": "text/plain; version=0.0.4"})
    return _json(
        {
            "result": RESULT[verdict],
            "verdict": verdict,
            "pairs": pairs,
            "since": since,
            "until": now,
            "weight": state.weight,
            "stage": state.stage,
            "status": state.status,
            "gates": evidence["gates"],
        }
    )


async def _reader_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    record = runtime.config.record
    reader = None
    if runtime.clients is not None:
        reader = AggregateReader(runtime.clients.get("control"), Keys(record.namespace, record.stream, record.shards))
    app[READER] = ReportSource(reader)
    yield
    runtime.reports.close()


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.cleanup_ctx.append(_reader_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/report", report)
    app.router.add_get("/api/canary", canary_status)
    app.router.add_get("/api/canary/verdict", canary_verdict)
    app.router.add_post("/api/canary/{action}", canary_action)
    dashboard.add_routes(app)  # GET / and /static/: the dashboard
    return app

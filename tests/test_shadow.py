"""Shadow dispatch: the candidate gets a faithful copy, and nothing it does reaches the live path."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from proxy.tools.embedded_redis import free_port

from .conftest import echo, eventually, records


def _hanging(release: asyncio.Event, arrived: list[str] | None = None):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        if arrived is not None:
            arrived.append(request.headers.get("x-request-id", ""))
        await release.wait()
        return web.json_response({"late": True})

    return handler


async def test_mirror_is_a_faithful_copy_with_marker_and_own_host(upstreams, proxies) -> None:
    """Method, path, query, body and headers are copied; a marker is added; Host is the candidate's."""
    incumbent = await upstreams(echo)
    candidate = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions?a=1&a=2"
        async with client.post(url, data=b'{"model":"m"}', headers={"Authorization": "Bearer k", "X-T": "1"}) as resp:
            assert resp.status == 200
    await eventually(lambda: len(candidate.requests) == 1)
    live, mirror = incumbent.requests[0], candidate.requests[0]
    assert mirror["method"] == "POST" and mirror["raw_path"] == "/v1/chat/completions?a=1&a=2"
    assert mirror["body"] == live["body"] == b'{"model":"m"}'
    mirror_headers = {k.lower(): v for k, v in mirror["headers"]}
    live_headers = {k.lower(): v for k, v in live["headers"]}
    assert mirror_headers.pop("x-shadow-request") == "1"
    assert "x-shadow-request" not in live_headers
    assert mirror_headers.pop("host") == candidate.url.removeprefix("http://")
    assert live_headers.pop("host") == incumbent.url.removeprefix("http://")
    assert mirror_headers == live_headers


async def test_hanging_candidate_does_not_hold_the_live_path(upstreams, proxies) -> None:
    """Every live answer arrives while the candidate is still hanging on all its mirrors."""
    release = asyncio.Event()
    arrived: list[str] = []
    incumbent = await upstreams(echo)
    candidate = await upstreams(_hanging(release, arrived))
    proxy = await proxies(incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 20)
    await eventually(lambda: len(arrived) == 20)
    (mirror,) = proxy.runtime.shadows
    assert not release.is_set() and mirror.in_flight == 20
    release.set()
    await eventually(lambda: mirror.in_flight == 0)
    gauge = proxy.runtime.metrics.value("shadow_proxy_mirrors_in_flight", target="candidate")
    assert gauge == 0


async def test_refusing_candidate_is_counted_and_recorded(upstreams, proxies, redis_url, redis_client) -> None:
    """Mirrors to a closed port fail as connect_error: counted, recorded, invisible to clients."""
    incumbent = await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": f"http://127.0.0.1:{free_port()}"},
        record={"redis_url": redis_url},
    )
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 5)
    metrics = proxy.runtime.metrics
    await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 5)
    assert metrics.value("shadow_proxy_mirrors_failed_total", target="candidate", error="connect_error") == 5
    for record in records(redis_client):
        assert record["meta"]["arms"]["shadow.candidate"]["error"] == "connect_error"
        assert record["meta"]["arms"]["live"]["status"] == 200


async def test_refusing_candidate_opens_the_breaker(upstreams, proxies) -> None:
    """After shadow.breaker_failures refused connections, mirrors are skipped as target_down, not dialled."""
    incumbent = await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": f"http://127.0.0.1:{free_port()}"},
        shadow={"breaker_failures": 3, "breaker_cooldown": 60.0},
        record={"enabled": False},
    )
    metrics = proxy.runtime.metrics
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 3)
        await eventually(
            lambda: metrics.value("shadow_proxy_mirrors_failed_total", target="candidate", error="connect_error") == 3
        )
        await _post(client, proxy.port, 5)
    assert metrics.value("shadow_proxy_mirrors_skipped_total", target="candidate", reason="target_down") == 5
    assert metrics.value("shadow_proxy_mirrors_sent_total", target="candidate") == 3


async def test_mirror_cap_drops_and_counts(upstreams, proxies, redis_url, redis_client) -> None:
    """Beyond shadow.max_in_flight mirrors are dropped as "full"; every request is still recorded."""
    release = asyncio.Event()
    incumbent = await upstreams(echo)
    candidate = await upstreams(_hanging(release))
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        shadow={"max_in_flight": 2},
        record={"redis_url": redis_url},
    )
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 5)
    metrics = proxy.runtime.metrics
    assert metrics.value("shadow_proxy_mirrors_sent_total", target="candidate") == 2
    assert metrics.value("shadow_proxy_mirrors_skipped_total", target="candidate", reason="full") == 3
    await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 3)
    release.set()
    await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 5)
    skipped = sorted(str(r["meta"]["shadow_skipped"]) for r in records(redis_client))
    assert skipped == ["None", "None", *["{'candidate': 'full'}"] * 3]


async def test_skip_reasons_are_counted(upstreams, proxies) -> None:
    """Unsampled, unmirrored routes and methods, and oversized bodies are each counted by reason."""
    incumbent = await upstreams(echo)
    candidate = await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        record={"enabled": False},
        shadow={"routes": ["/v1/*"], "max_body_bytes": 10},
    )
    async with aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{proxy.port}"
        for method, path, body in [("POST", "/other", b"{}"), ("GET", "/v1/x", b""), ("POST", "/v1/x", b"x" * 11)]:
            async with client.request(method, base + path, data=body) as resp:
                assert resp.status == 200
    metrics = proxy.runtime.metrics
    assert metrics.value("shadow_proxy_mirrors_skipped_total", target="candidate", reason="route_not_mirrored") == 2
    assert metrics.value("shadow_proxy_mirrors_skipped_total", target="candidate", reason="body_too_large") == 1
    assert candidate.requests == []


async def test_sample_rate_zero_mirrors_nothing(upstreams, proxies) -> None:
    """With sample_rate 0 every eligible request is counted as not_sampled."""
    incumbent = await upstreams(echo)
    candidate = await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        shadow={"sample_rate": 0.0},
        record={"enabled": False},
    )
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}"):
                pass
    assert (
        proxy.runtime.metrics.value("shadow_proxy_mirrors_skipped_total", target="candidate", reason="not_sampled") == 3
    )
    assert candidate.requests == []


async def test_client_disconnect_cancels_incumbent_but_not_mirror(upstreams, proxies, redis_url, redis_client) -> None:
    """A client leaving mid-stream stops the incumbent request; the mirror runs on and both are recorded."""
    incumbent_gone = asyncio.Event()
    release_candidate = asyncio.Event()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            incumbent_gone.set()
            raise
        return resp

    async def candidate_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: c1\n\n")
        await release_candidate.wait()
        await resp.write(b"data: c2\n\ndata: [DONE]\n\n")
        return resp

    incumbent = await upstreams(slow_stream)
    candidate = await upstreams(candidate_stream)
    proxy = await proxies(
        incumbent={"url": incumbent.url}, candidate={"url": candidate.url}, record={"redis_url": redis_url}
    )
    async with aiohttp.ClientSession() as client:
        resp = await client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", data=b"{}")
        assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
        resp.close()
    metrics = proxy.runtime.metrics
    await eventually(lambda: metrics.value("shadow_proxy_client_disconnects_total") == 1)
    await eventually(incumbent_gone.is_set)
    assert metrics.value("shadow_proxy_records_written_total") == 0
    release_candidate.set()
    await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 1)
    (record,) = records(redis_client)
    assert record["meta"]["client_disconnected"] is True
    assert record["meta"]["arms"]["live"]["error"] == "client_disconnected"
    assert record["meta"]["arms"]["shadow.candidate"]["error"] is None
    assert record["body.shadow.candidate"] == b"data: c1\n\ndata: c2\n\ndata: [DONE]\n\n"


async def test_shutdown_cancels_mirrors_past_the_drain_deadline_and_records_them(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """A mirror still hanging at shutdown is cancelled after shadow.drain_timeout and recorded as such."""
    release = asyncio.Event()
    arrived: list[str] = []
    incumbent = await upstreams(echo)
    candidate = await upstreams(_hanging(release, arrived))
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        shadow={"drain_timeout": 0.1},
        record={"redis_url": redis_url},
    )
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
            assert resp.status == 200
    await eventually(lambda: len(arrived) == 1)
    await proxy.stop()
    release.set()
    metrics = proxy.runtime.metrics
    assert metrics.value("shadow_proxy_mirrors_failed_total", target="candidate", error="cancelled_at_shutdown") == 1
    assert metrics.value("shadow_proxy_records_written_total") == 1
    (record,) = records(redis_client)
    assert record["meta"]["arms"]["shadow.candidate"]["error"] == "cancelled_at_shutdown"


async def test_a_candidate_that_never_answers_is_ejected_holds_few_slots_and_is_readmitted_when_it_answers(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """Mirrors without headers past slow_after eject the target and give their slots back; once it answers
    again a probe closes the breaker and mirrors flow and are recorded. The live path sees only 200s."""
    release = asyncio.Event()
    incumbent = await upstreams(echo)
    candidate = await upstreams(_hanging(release))
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        shadow={"slow_after": 0.2, "breaker_failures": 3, "breaker_cooldown": 0.2, "breaker_max_cooldown": 0.4},
        record={"redis_url": redis_url},
    )
    (mirror,) = proxy.runtime.shadows
    metrics = proxy.runtime.metrics

    def value(name: str, **labels: str) -> float:
        return metrics.value(name, target="candidate", **labels)

    def answered() -> float:
        return metrics.value("shadow_proxy_upstream_duration_seconds_count", upstream="candidate", role="shadow")

    sent, peak = 0, 0
    async with aiohttp.ClientSession() as client:

        async def until(done, limit: int = 500) -> None:  # type: ignore[no-untyped-def]
            # A steady request rate (a pause between requests) until the condition holds.
            nonlocal sent, peak
            for _ in range(limit):
                async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
                    assert resp.status == 200
                sent += 1
                peak = max(peak, mirror.in_flight)
                if done():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("condition not reached")

        # Ejected, and at least one probe failed too (it was ejected as well, not left hanging).
        await until(lambda: value("shadow_proxy_mirror_ejections_total") >= 2)
        assert not release.is_set()
        await eventually(lambda: mirror.in_flight == 0)  # every hung mirror gave its slot back
        assert peak < 40, f"{peak} slots held by a candidate that never answers"  # of max_in_flight 256
        assert value("shadow_proxy_mirrors_skipped_total", reason="full") == 0
        assert value("shadow_proxy_mirrors_skipped_total", reason="target_down") > 0
        assert value("shadow_proxy_mirrors_failed_total", error="ejected") >= 3
        assert value("shadow_proxy_mirrors_slow_total") >= 3

        release.set()  # the candidate recovers
        await until(lambda: value("shadow_proxy_mirror_breaker_state") == 0 and answered() >= 3)
    await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == sent)
    arms = [r["meta"]["arms"].get("shadow.candidate") for r in records(redis_client)]
    skipped = [r["meta"]["shadow_skipped"] for r in records(redis_client)]
    assert all(arm is None or arm["error"] in {"ejected", None} for arm in arms)
    assert sum(arm is not None and arm["error"] == "ejected" for arm in arms) >= 3
    assert {"candidate": "target_down"} in skipped
    assert arms[-1] is not None and arms[-1]["status"] == 200 and arms[-1]["error"] is None


async def test_a_slow_candidate_within_the_threshold_is_not_ejected(upstreams, proxies) -> None:
    """Answers that take a while, but send headers before the candidate's slow_after, are measured, never ejected
    (the candidate's own slow_after overrides the [shadow] one, which these answers would exceed)."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.json_response({"ok": True})

    incumbent = await upstreams(echo)
    candidate = await upstreams(slow)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url, "slow_after": 5.0},
        shadow={"slow_after": 0.01, "breaker_failures": 2},
        record={"enabled": False},
    )
    (mirror,) = proxy.runtime.shadows
    metrics = proxy.runtime.metrics
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 10)
    await eventually(lambda: mirror.in_flight == 0)
    assert metrics.value("shadow_proxy_upstream_duration_seconds_count", upstream="candidate", role="shadow") == 10
    assert metrics.value("shadow_proxy_mirrors_slow_total", target="candidate") == 0
    assert metrics.value("shadow_proxy_mirror_ejections_total", target="candidate") == 0
    assert metrics.value("shadow_proxy_mirror_breaker_state", target="candidate") == 0


async def test_occasional_timeouts_below_the_threshold_do_not_eject(upstreams, proxies) -> None:
    """A read timeout every other mirror never makes breaker_failures in a row: every mirror is still sent."""
    release = asyncio.Event()
    calls = 0

    async def every_other_hangs(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls % 2:
            await release.wait()
        return web.json_response({"ok": True})

    incumbent = await upstreams(echo)
    candidate = await upstreams(every_other_hangs)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url, "read_timeout": 0.2},
        shadow={"breaker_failures": 2},
        record={"enabled": False},
    )
    (mirror,) = proxy.runtime.shadows
    metrics = proxy.runtime.metrics
    async with aiohttp.ClientSession() as client:
        for _ in range(8):
            async with client.post(f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}") as resp:
                assert resp.status == 200
            await eventually(lambda: mirror.in_flight == 0)  # outcomes reach the breaker in request order
    release.set()
    assert metrics.value("shadow_proxy_mirrors_failed_total", target="candidate", error="read_timeout") == 4
    assert metrics.value("shadow_proxy_mirrors_sent_total", target="candidate") == 8
    assert metrics.value("shadow_proxy_mirror_ejections_total", target="candidate") == 0
    assert metrics.value("shadow_proxy_mirrors_skipped_total", target="candidate", reason="target_down") == 0


class _Switchable:
    """A candidate answering after ``delay`` seconds, or, once ``hang`` is set, not until ``release`` is."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.hang = False
        self.release = asyncio.Event()

    async def __call__(self, request: web.Request) -> web.Response:
        if self.hang:
            await self.release.wait()
        await asyncio.sleep(self.delay)
        return web.json_response({"ok": True})


async def _post(client: aiohttp.ClientSession, port: int, count: int) -> None:
    """``count`` live requests one after another (their mirrors overlap: they run in the background)."""
    for _ in range(count):
        async with client.post(f"http://127.0.0.1:{port}/v1/x", data=b"{}") as resp:
            assert resp.status == 200


def _answered(proxy) -> float:  # type: ignore[no-untyped-def]
    return proxy.runtime.metrics.value(
        "shadow_proxy_upstream_duration_seconds_count", upstream="candidate", role="shadow"
    )


async def test_a_fast_candidate_that_hangs_is_ejected_after_the_learned_threshold_not_slow_after(
    upstreams, proxies
) -> None:
    """After 60 answers in about 50 ms the slow threshold is learned (the 1 s floor, far below a slow_after of
    60 s): when the candidate then hangs it is ejected within seconds and its hung mirrors are given back."""
    candidate = _Switchable(0.05)
    incumbent = await upstreams(echo)
    server = await upstreams(candidate)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": server.url},
        shadow={"slow_after": 60.0, "breaker_failures": 5, "breaker_cooldown": 60.0},
        record={"enabled": False},
    )
    (mirror,) = proxy.runtime.shadows
    metrics = proxy.runtime.metrics

    def value(name: str, **labels: str) -> float:
        return metrics.value(name, target="candidate", **labels)

    assert value("shadow_proxy_mirror_slow_after_seconds") == 60.0  # no history yet
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 60)
        await eventually(lambda: _answered(proxy) == 60)
        learned = value("shadow_proxy_mirror_slow_after_seconds")
        assert 1.0 <= learned < 5.0  # max(1 s floor, 4 x ~50 ms), with room for a loaded machine

        candidate.hang = True
        async with asyncio.timeout(20):  # generous: slow_after (60 s) would never make it
            while value("shadow_proxy_mirror_ejections_total") == 0:
                await _post(client, proxy.port, 1)
                await asyncio.sleep(0.02)
    assert value("shadow_proxy_mirrors_slow_total") >= 5
    await eventually(lambda: mirror.in_flight == 0)  # every hung mirror gave its slot back
    assert value("shadow_proxy_mirrors_failed_total", error="ejected") >= 5
    assert value("shadow_proxy_mirror_slow_after_seconds") == learned < 60.0
    candidate.release.set()


async def test_a_candidate_with_too_little_history_waits_the_whole_slow_after(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """Fewer than slow_min_samples answers teach nothing: mirrors to a candidate that then hangs are slow,
    and ejected, only after slow_after (the records show each waited at least that long)."""
    candidate = _Switchable(0.05)
    incumbent = await upstreams(echo)
    server = await upstreams(candidate)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": server.url},
        shadow={"slow_after": 1.0, "slow_floor": 0.05, "breaker_failures": 2, "breaker_cooldown": 60.0},
        record={"redis_url": redis_url},
    )
    metrics = proxy.runtime.metrics
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 10)
        await eventually(lambda: _answered(proxy) == 10)
        assert metrics.value("shadow_proxy_mirror_slow_after_seconds", target="candidate") == 1.0
        candidate.hang = True
        await _post(client, proxy.port, 2)
    await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 12)
    ejected = [
        arm for r in records(redis_client) if (arm := r["meta"]["arms"]["shadow.candidate"])["error"] == "ejected"
    ]
    assert len(ejected) == 2 and all(arm["duration_ms"] >= 1000.0 for arm in ejected)
    assert metrics.value("shadow_proxy_mirror_ejections_total", target="candidate") == 1
    candidate.release.set()


async def test_a_steadily_slow_candidate_is_not_ejected(upstreams, proxies) -> None:
    """Answers that always take about 300 ms teach a threshold of about 4 x 300 ms, which they keep to."""
    incumbent = await upstreams(echo)
    server = await upstreams(_Switchable(0.3))
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": server.url},
        shadow={"slow_after": 60.0, "breaker_failures": 2},
        record={"enabled": False},
    )
    metrics = proxy.runtime.metrics
    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 60)
        await eventually(lambda: _answered(proxy) == 60)
        learned = metrics.value("shadow_proxy_mirror_slow_after_seconds", target="candidate")
        assert 1.2 <= learned < 60.0
        await _post(client, proxy.port, 60)
        await eventually(lambda: _answered(proxy) == 120)
    assert metrics.value("shadow_proxy_mirrors_slow_total", target="candidate") == 0
    assert metrics.value("shadow_proxy_mirror_ejections_total", target="candidate") == 0


async def test_a_candidate_whose_latency_jumps_is_briefly_ejected_then_readmitted_and_relearned(
    upstreams, proxies
) -> None:
    """Answers that suddenly take far longer than the learned threshold eject the candidate; the probe waits
    the whole slow_after, answers, readmits it and restarts the learning, which settles on the new latency."""
    candidate = _Switchable(0.05)
    incumbent = await upstreams(echo)
    server = await upstreams(candidate)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": server.url},
        shadow={
            "slow_after": 60.0,
            "slow_floor": 0.1,
            "breaker_failures": 3,
            "breaker_cooldown": 0.2,
            "breaker_max_cooldown": 0.4,
        },
        record={"enabled": False},
    )
    metrics = proxy.runtime.metrics

    def value(name: str, **labels: str) -> float:
        return metrics.value(name, target="candidate", **labels)

    async with aiohttp.ClientSession() as client:
        await _post(client, proxy.port, 60)
        await eventually(lambda: _answered(proxy) == 60)
        learned = value("shadow_proxy_mirror_slow_after_seconds")
        assert learned < 1.5  # 4 x ~50 ms, with room for a loaded machine

        candidate.delay = 2.0  # legitimately slower, at once
        async with asyncio.timeout(20):
            while not (
                value("shadow_proxy_mirror_ejections_total") >= 1
                and value("shadow_proxy_mirror_breaker_state") == 0
                and value("shadow_proxy_mirror_slow_after_seconds") == 60.0
            ):
                await _post(client, proxy.port, 1)
                await asyncio.sleep(0.02)
        ejections = value("shadow_proxy_mirror_ejections_total")

        before = _answered(proxy)
        await _post(client, proxy.port, 50)
        await eventually(lambda: _answered(proxy) >= before + 50)
    assert 8.0 <= value("shadow_proxy_mirror_slow_after_seconds") < 60.0  # 4 x ~2 s
    assert value("shadow_proxy_mirror_ejections_total") == ejections
    assert value("shadow_proxy_mirror_breaker_state") == 0

"""Canary promotion with real parts: Redis, proxy replicas, the comparator and the controller."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from aiohttp import web

from proxy.canary.controller import Controller
from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker
from proxy.tools.embedded_redis import free_port

from .conftest import echo, eventually, make_config, wait_healthy

FAST = {"window_seconds": 1, "gates": {"min_pairs": 15, "error_rate_increase_pp": 25.0}}


def _stages(*weights: float, duration: float = 1.5, pairs: int = 15) -> list[dict[str, Any]]:
    return [{"weight": w, "min_duration": duration, "min_pairs": pairs, "gates": ["error_rate"]} for w in weights]


def _canary(**overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "evaluate_interval": 0.2,
        "lease_ttl": 2.0,
        "weight_poll_interval": 0.5,
        "stage": _stages(0.0, 0.2, 0.6, 1.0),
        "served_by_header": "x-served-by",  # off by default; these tests read which arm served
        **overrides,
    }


def chat(state: dict[str, bool]):  # type: ignore[no-untyped-def]
    """A chat endpoint that fails while state["broken"] is true."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        if state.get("broken"):
            return web.json_response({"error": {"message": "broken"}}, status=500)
        return web.json_response(
            {"object": "chat.completion", "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]}
        )

    return handler


@contextlib.asynccontextmanager
async def traffic(port: int, users: int = 40, rate: float = 80.0):  # type: ignore[no-untyped-def]
    """Requests from a fixed set of users at a steady rate until the block ends; yields the answers seen."""
    seen: list[tuple[str, str, int]] = []
    stop = asyncio.Event()

    async def loop() -> None:
        async with aiohttp.ClientSession() as client:
            i = 0
            while not stop.is_set():
                user = f"u{i % users}"
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                with contextlib.suppress(aiohttp.ClientError):
                    async with client.post(url, data=b'{"model": "m"}', headers={"X-User-Id": user}) as resp:
                        await resp.read()
                        seen.append((user, resp.headers.get("x-served-by", ""), resp.status))
                i += 1
                await asyncio.sleep(1 / rate)

    task = asyncio.create_task(loop())
    try:
        yield seen
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def comparator(redis_url: str):  # type: ignore[no-untyped-def]
    worker = Worker(make_config(record={"redis_url": redis_url}, compare={**FAST, "block_ms": 100}), redis_url)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await task
        await worker.close()


def _children(pid: int) -> list[int]:
    """Child process ids of a process (Linux /proc)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _events(client: redis.Redis) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"event"]) for _, f in client.xrange("{shadow}:canary:events")]


def _state(client: redis.Redis) -> dict[str, Any]:
    raw = client.get("{shadow}:canary:state")
    return orjson.loads(raw) if raw else {}


async def test_healthy_candidate_is_promoted_through_every_stage(upstreams, proxies, redis_url, redis_client) -> None:
    """With passing gates the controller walks shadow -> 20% -> 60% -> 100% -> promoted on its own."""
    healthy: dict[str, bool] = {}
    incumbent, candidate = await upstreams(chat(healthy)), await upstreams(chat(healthy))
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        record={"redis_url": redis_url},
        compare=FAST,
        canary=_canary(),
    )
    async with comparator(redis_url), traffic(proxy.port) as seen:
        await eventually(lambda: _state(redis_client).get("status") == "promoted", within=60)
        await asyncio.sleep(0.3)
        after = len(seen)
        await eventually(lambda: len(seen) > after + 10, within=10)
        served_last = {arm for _, arm, _ in seen[after:]}
    assert [e["action"] for e in _events(redis_client)] == ["advance", "advance", "advance", "promoted"]
    assert all(e["evidence"]["gates"]["error_rate"]["outcome"] == "pass" for e in _events(redis_client))
    assert served_last == {"candidate"}
    assert proxy.runtime.metrics.value("shadow_proxy_canary_weight") == 1.0


async def test_candidate_failing_at_second_stage_is_rolled_back(upstreams, proxies, redis_url, redis_client) -> None:
    """500s from the candidate at the second stage roll back to 0% with an event that says why."""
    broken: dict[str, bool] = {}
    incumbent, candidate = await upstreams(chat({})), await upstreams(chat(broken))
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        record={"redis_url": redis_url},
        compare=FAST,
        canary=_canary(),
    )
    async with comparator(redis_url), traffic(proxy.port) as seen:
        await eventually(lambda: _state(redis_client).get("stage") == 2, within=60)
        broken["broken"] = True
        await eventually(lambda: _state(redis_client).get("status") == "rolled_back", within=60)
        await asyncio.sleep(0.3)
        after = len(seen)
        await eventually(lambda: len(seen) > after + 10, within=10)
        served_last = {arm for _, arm, _ in seen[after:]}
    last = _events(redis_client)[-1]
    assert last["action"] == "rollback" and last["actor"] == "controller"
    assert last["reason"] == "stage 2 gate(s) failed: error_rate"
    assert last["evidence"]["gates"]["error_rate"]["outcome"] == "fail"
    assert last["from"]["weight"] == 0.6 and last["to"]["weight"] == 0.0
    assert served_last == {"incumbent"}


async def test_two_controllers_never_both_act(redis_url, redis_client) -> None:
    """One lease: the second controller waits; transitions are committed once each."""
    config = make_config(record={"redis_url": redis_url}, compare=FAST, canary=_canary(lease_ttl=1.0))
    first, second = Controller(config, redis_url, holder="a"), Controller(config, redis_url, holder="b")
    try:
        assert await first.store.hold_lease("a", 1000) is True
        assert await second.store.hold_lease("b", 1000) is False
        assert await first.store.hold_lease("a", 1000) is True  # renewal
        await first.store.release_lease("a")
        assert await second.store.hold_lease("b", 1000) is True
        await second.store.release_lease("b")
        # Both loops race on the same stored state; compare-and-set lets each version change once.
        state = await first.current()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(c.run(stop)) for c in (first, second)]
        await first.act("set-weight", actor="t", reason="r", weight=0.3)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        versions = [e["version"] for e in _events(redis_client)]
        assert versions == list(range(state.version + 1, state.version + 1 + len(versions)))
    finally:
        await first.close()
        await second.close()


async def test_feedback_joins_to_the_arm_that_served(upstreams, proxies, redis_url) -> None:
    """Feedback with its token is stored against the arm named in its x-served-by; bad input is refused."""
    incumbent, candidate = await upstreams(chat({})), await upstreams(chat({}))
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        record={"redis_url": redis_url},
        compare=FAST,
        canary=_canary(stage=_stages(0.5, duration=3600)),
    )
    served: dict[str, str] = {}
    tokens: dict[str, str] = {}
    async with aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{proxy.port}"
        for i in range(30):
            async with client.post(f"{base}/v1/chat/completions", data=b"{}", headers={"X-User-Id": f"u{i}"}) as resp:
                served[resp.headers["x-request-id"]] = resp.headers["x-served-by"]
                tokens[resp.headers["x-request-id"]] = resp.headers["x-feedback-token"]
        assert set(served.values()) == {"incumbent", "candidate"}
        await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 30)
        for request_id, arm in served.items():
            feedback = {"request_id": request_id, "score": 0.8, "token": tokens[request_id]}
            async with client.post(f"{base}/_shadow/feedback", json=feedback) as resp:
                assert resp.status == 200 and (await resp.json())["arm"] == arm
        request_id = next(iter(served))
        token = tokens[request_id]
        # The endpoint issues no token itself: a token for an unknown id is forged from the same secret.
        assert proxy.runtime.forwarder.feedback_tokens is not None
        unknown = proxy.runtime.forwarder.feedback_tokens.issue("nope")
        cases = [
            ({"request_id": request_id, "score": 1, "token": token}, 409),
            ({"request_id": "nope", "score": 1, "token": unknown}, 404),
            ({"request_id": request_id, "score": 2}, 400),
            ({"request_id": request_id}, 400),
            ({"request_id": request_id, "score": 1, "label": "x"}, 400),
            ([1], 400),
        ]
        for body, status in cases:
            async with client.post(f"{base}/_shadow/feedback", json=body) as resp:
                assert resp.status == status, body
                assert "message" in (await resp.json())["error"]
        async with client.post(f"{base}/_shadow/feedback", data=b"not json") as resp:
            assert resp.status == 400
    assert proxy.runtime.canary is not None
    counters = await proxy.runtime.canary.controller.reader.feedback(time.time() - 60, time.time(), 1)
    expected = {arm: sum(1 for a in served.values() if a == arm) for arm in ("incumbent", "candidate")}
    assert {arm: counters.get(f"scored:{arm}") for arm in expected} == {k: float(v) for k, v in expected.items()}
    config = make_config(record={"redis_url": redis_url}, compare=FAST)
    report = (await load_report(config, redis_url, since_seconds=600)).as_json()
    satisfaction = report["summary"]["satisfaction"]
    assert {arm: satisfaction[arm]["scored"] for arm in expected} == expected
    assert satisfaction["candidate"]["mean_score"] == 0.8
    assert any("User feedback only compares arms" in note for note in report["notes"])


async def test_canary_api_requires_the_token_and_records_the_actor(upstreams, proxies, redis_url, redis_client) -> None:
    """Mutations: 401 without a token, 403 with a wrong one, 200 with it; the event names actor and reason."""
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate={"url": candidate.url},
        record={"redis_url": redis_url},
        admin={"token": "s3cret"},
        canary=_canary(),
    )
    url = f"http://127.0.0.1:{proxy.admin_port}/api/canary"
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{url}/pause") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with client.post(f"{url}/pause", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 403
        auth = {"Authorization": "Bearer s3cret"}
        async with client.post(
            f"{url}/set-weight", headers=auth, json={"weight": 0.25, "actor": "ann", "reason": "try a quarter"}
        ) as resp:
            assert resp.status == 200 and (await resp.json())["state"]["weight"] == 0.25
        async with client.post(f"{url}/set-weight", headers=auth, json={"weight": 3}) as resp:
            assert resp.status == 400
        async with client.get(url) as resp:
            status = await resp.json()
        async with client.get(f"{url}/verdict") as resp:
            verdict = await resp.json()
        async with client.get(f"{url}/verdict?format=text") as resp:
            text = await resp.text()
        async with client.get(f"{url}/verdict?format=prometheus") as resp:
            exposition = await resp.text()
    assert status["state"]["weight"] == 0.25 and status["state"]["status"] == "paused"
    assert status["history"][0]["actor"] == "ann" and status["history"][0]["reason"] == "try a quarter"
    assert verdict["result"] in (0.0, 0.5, 1.0) and verdict["verdict"] == "inconclusive"
    assert text.strip() == "0.5"
    assert "\nshadow_proxy_verdict_result 0.5\n" in exposition
    assert b"s3cret" not in b"".join(v for _, f in redis_client.xrange("{shadow}:canary:events") for v in f.values())


async def test_mutations_are_refused_when_no_token_is_configured(upstreams, proxies, redis_url) -> None:
    """Without admin.token every mutation is forbidden."""
    incumbent = await upstreams(echo)
    proxy = await proxies(incumbent={"url": incumbent.url}, record={"redis_url": redis_url})
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"http://127.0.0.1:{proxy.admin_port}/api/canary/promote", headers={"Authorization": "Bearer x"}
        ) as resp:
            assert resp.status == 403


# --- two replicas in separate processes -------------------------------------------------------------


def _write_config(tmp_path: Path, redis_url: str, incumbent: str, candidate: str) -> Path:
    path = tmp_path / "canary.toml"
    path.write_text(f"""
[incumbent]
url = "{incumbent}"
[candidate]
url = "{candidate}"
[record]
redis_url = "{redis_url}"
[canary]
enabled = true
served_by_header = "x-served-by"
weight_poll_interval = 5.0
lease_ttl = 2.0
evaluate_interval = 0.5
[[canary.stage]]
weight = 0.0
min_duration = 3600
[[canary.stage]]
weight = 1.0
min_duration = 3600
""")
    return path


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: start a `serve` process with a config; returns (process, port, admin port)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path) -> tuple[subprocess.Popen[bytes], int, int]:
        port, admin = free_port(), free_port()
        with (tmp_path / f"serve-{port}.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "serve",
                    "--config",
                    str(config),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--admin-listen",
                    f"127.0.0.1:{admin}",
                ],
                env={"PATH": os.environ.get("PATH", "")},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        wait_healthy(admin, process)
        return process, port, admin

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _served(client: aiohttp.ClientSession, port: int, users: int) -> dict[str, str]:
    arms = {}
    for i in range(users):
        async with client.get(f"http://127.0.0.1:{port}/x", headers={"X-User-Id": f"user-{i}"}) as resp:
            arms[f"user-{i}"] = resp.headers["x-served-by"]
    return arms


async def _weight(client: aiohttp.ClientSession, admin: int) -> float:
    async with client.get(f"http://127.0.0.1:{admin}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("shadow_proxy_canary_weight "):
                return float(line.split()[1])
    return -1.0


async def test_replicas_route_stickily_and_see_weight_changes_within_a_second(
    upstreams, replicas, redis_url, tmp_path: Path
) -> None:
    """Two processes agree on every user's arm; a weight change reaches both in under a second."""
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    config_path = _write_config(tmp_path, redis_url, incumbent.url, candidate.url)
    (_, port_a, admin_a), (_, port_b, admin_b) = replicas(config_path), replicas(config_path)
    controller = Controller(make_config(record={"redis_url": redis_url}, canary=_canary()), redis_url)
    try:
        async with aiohttp.ClientSession() as client:
            shares = {}
            previous: set[str] = set()
            for weight in (0.3, 0.6):
                await controller.act("set-weight", actor="test", reason="step", weight=weight)
                started = time.monotonic()
                while not all([await _weight(client, a) == weight for a in (admin_a, admin_b)]):
                    assert time.monotonic() - started < 1.0, "weight change took more than a second"
                    await asyncio.sleep(0.01)
                a, b = await _served(client, port_a, 200), await _served(client, port_b, 200)
                assert a == b
                on_candidate = {user for user, arm in a.items() if arm == "candidate"}
                assert previous <= on_candidate  # raising the weight only moves users to the candidate
                previous = on_candidate
                shares[weight] = len(on_candidate) / 200
            assert 0.2 < shares[0.3] < 0.4 and 0.5 < shares[0.6] < 0.7
    finally:
        await controller.close()


async def test_controller_killed_mid_stage_resumes_after_restart(
    upstreams, replicas, redis_url, redis_client, tmp_path: Path
) -> None:
    """SIGKILL the replica holding the lease: another takes it over and the stage keeps its start time."""
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    config_path = _write_config(tmp_path, redis_url, incumbent.url, candidate.url)
    first, _, _ = replicas(config_path)
    await eventually(lambda: redis_client.get("{shadow}:canary:lease") is not None, within=10)
    holder = redis_client.get("{shadow}:canary:lease")
    controller = Controller(make_config(record={"redis_url": redis_url}, canary=_canary()), redis_url)
    try:
        await controller.act("promote", actor="test", reason="to stage 1")
    finally:
        await controller.close()
    before = _state(redis_client)
    assert before["stage"] == 1
    await eventually(lambda: bool(_children(first.pid)), within=15)  # its report builder (a child process)
    orphans = _children(first.pid)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # The report builder dies with its parent instead of lingering as an orphan.
    await eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in orphans), within=10)
    replicas(config_path)
    await eventually(lambda: redis_client.get("{shadow}:canary:lease") not in (None, holder), within=15)
    after = _state(redis_client)
    assert (after["stage"], after["stage_started"], after["version"]) == (
        before["stage"],
        before["stage_started"],
        before["version"],
    )


async def test_redis_outage_keeps_the_last_weight_and_the_live_path(upstreams, proxies, tmp_path: Path) -> None:
    """With Redis gone, a replica keeps routing by the weight it knew, and clients see no errors."""
    from proxy.tools.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    server.start()
    try:
        incumbent, candidate = await upstreams(echo), await upstreams(echo)
        proxy = await proxies(
            incumbent={"url": incumbent.url},
            candidate={"url": candidate.url},
            record={"redis_url": server.url, "socket_timeout": 0.5},
            canary=_canary(stage=_stages(0.5, duration=3600), weight_poll_interval=0.2),
        )
        assert proxy.runtime.canary is not None and proxy.runtime.canary.weights is not None
        await eventually(lambda: proxy.runtime.canary.weights.weight == 0.5)
        server.stop()
        async with aiohttp.ClientSession() as client:
            arms = set()
            for i in range(40):
                async with client.post(
                    f"http://127.0.0.1:{proxy.port}/v1/x", data=b"{}", headers={"X-User-Id": f"u{i}"}
                ) as resp:
                    assert resp.status == 200
                    arms.add(resp.headers["x-served-by"])
        assert arms == {"incumbent", "candidate"}
        assert proxy.runtime.canary.weights.weight == 0.5
    finally:
        server.stop()

"""shadow.isolation = "process": mirrors and records in a shadow process, the live path alone on its loop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import orjson
import redis

from proxy.exchange import ArmCapture, Exchange
from proxy.isolation.child import ShadowSide
from proxy.isolation.frames import PREFIX, done_frame, exchange_of, fill_live, request_frame
from proxy.tools.embedded_redis import free_port
from proxy.wiring import Runtime

from .conftest import echo, eventually, make_config, records
from .models import openai_chat


def _split(pieces: list[bytes]) -> tuple[dict[str, object], bytes]:
    head, size = PREFIX.unpack(pieces[0])
    data = b"".join(pieces[1:])
    assert len(data) == head + size
    return orjson.loads(data[:head]), data[head:]


def test_frames_carry_the_request_and_the_live_arm_unchanged() -> None:
    """A REQ then a DONE frame rebuild the exchange and its live arm as the serving process saw them."""
    sent = Exchange("rid", "POST", "/v1/x", "a=1", "/v1/*", [("A", "b")], "10.0.0.1", 1.5, 2.5, body=b"{}")
    sent.client_request_id = "client"
    sent.live = ArmCapture("incumbent", "live", 1024, start=3.0)
    sent.live.on_headers(200, [("Content-Type", "text/event-stream")], 3.1)
    for at, chunk in ((3.2, b"data: 1\n\n"), (3.3, b"data: 2\n\n")):
        sent.live.on_chunk(chunk, at)
    sent.live.finish(3.4)
    sent.response_status = 200
    header, body = _split(request_frame(sent, "/v1/x?a=1", [("Host", "up")]))
    got, target, headers = exchange_of(header, body)
    fill_live(got, *_split(done_frame(sent)))
    assert (target, headers, got.body, got.path, got.query) == ("/v1/x?a=1", [("Host", "up")], b"{}", "/v1/x", "a=1")
    assert got.client_request_id == "client" and got.response_status == 200 and got.pending == 1
    assert got.live is not None
    assert got.live.summary(got.received) == sent.live.summary(sent.received)
    assert got.live.body == sent.live.body


async def test_the_shadow_process_bounds_and_forgets_requests_whose_live_end_never_comes(redis_url) -> None:
    """Over isolation_max_pending a request's record is dropped (pending_full); a request without its DONE is
    forgotten after isolation_pending_timeout (live_lost); one whose DONE comes is recorded."""
    config = make_config(
        incumbent={"url": "http://127.0.0.1:9"},
        record={"redis_url": redis_url, "linger": 0.0},
        shadow={"isolation_max_pending": 2, "isolation_pending_timeout": 0.2},
    )
    runtime = Runtime.build(config)
    side = ShadowSide(runtime, config)
    await side.start()
    sent: list[Exchange] = []
    live = ArmCapture("incumbent", "live", 1024)
    try:
        for index in range(3):
            exchange = Exchange(f"r{index}", "POST", "/v1/x", "", "other", [], "", 1.0, 2.0, body=b"{}")
            exchange.live = live if index == 0 else ArmCapture("incumbent", "live", 1024)
            side.on_request(*_split(request_frame(exchange, "/v1/x", [])))
            sent.append(exchange)
        metrics = runtime.metrics.registry
        assert metrics.get_sample_value("shadow_proxy_records_dropped_total", {"reason": "pending_full"}) == 1
        live.on_headers(200, [], 2.1)
        live.finish(2.2)
        side.on_done(*_split(done_frame(sent[0])))
        await eventually(
            lambda: metrics.get_sample_value("shadow_proxy_records_dropped_total", {"reason": "live_lost"}) == 1
        )
        await eventually(lambda: metrics.get_sample_value("shadow_proxy_records_written_total") == 1)
    finally:
        await side.close()


async def test_the_canary_candidate_serves_in_the_serving_process_and_the_incumbent_is_mirrored_back(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """In process mode (an in-process server spawning its shadow process) the canary's candidate answers users
    from the serving process, and the shadow process mirrors the incumbent back and the other candidate."""
    incumbent = await upstreams(openai_chat(["a"], served_model="gpt-4o-mini"))
    vllm = await upstreams(openai_chat(["b"], served_model="llama-8b"))
    mini = await upstreams(openai_chat(["c"], served_model="gpt-4.1-mini"))
    stage = {"weight": 1.0, "min_duration": 3600, "min_pairs": 100_000}
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate=[
            {"name": "mini", "url": mini.url, "model": "gpt-4.1-mini"},
            {"name": "vllm", "url": vllm.url, "model": "llama-8b"},
        ],
        record={"redis_url": redis_url},
        shadow={"isolation": "process"},
        canary={"enabled": True, "candidate": "vllm", "stage": [stage], "weight_poll_interval": 0.1},
    )
    assert proxy.runtime.link is not None and proxy.runtime.link.up
    assert proxy.runtime.canary is not None and proxy.runtime.canary.weights is not None
    await eventually(lambda: proxy.runtime.canary.weights.weight == 1.0)  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as client:
        body = {"model": "gpt-4o-mini", "messages": []}
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"] == "b"
    await eventually(lambda: redis_client.xlen("{shadow}:records") == 1)
    (record,) = records(redis_client)
    arms = record["meta"]["arms"]
    assert record["meta"]["served_by"] == "vllm"
    assert (arms["live"]["upstream"], arms["live"]["model"], arms["live"]["status"]) == ("vllm", "llama-8b", 200)
    assert arms["shadow.incumbent"]["status"] == 200 and arms["shadow.mini"]["status"] == 200
    assert "shadow.vllm" not in arms
    assert len(vllm.requests) == 1 and len(incumbent.requests) == 1 and len(mini.requests) == 1


def _serve(
    incumbent: str, candidate: str, redis_url: str, log: Path, **env: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin = free_port(), free_port()
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "SHADOW_PROXY_SHADOW_ISOLATION": "process",
        "SHADOW_PROXY_COMPARE_NOISE_SAMPLE_RATE": "1.0",
        "SHADOW_PROXY_RECORD_LINGER": "0.01",
        **env,
    }
    args = ["serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
    args += ["--incumbent", incumbent, "--candidate", candidate, "--redis-url", redis_url]
    with log.open("ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "proxy", *args], env=environ, stdout=output, stderr=output)
    return process, port, admin


def _metric(admin: int, name: str, **labels: str) -> float:
    """One sample's value from the admin /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _shadow_pids(log: Path) -> list[int]:
    """The shadow processes that connected so far, in order (from the serving process's log)."""
    lines = [line for line in log.read_text().splitlines() if "shadow_process_connected" in line]
    return [int(m.group(1)) for line in lines if (m := re.search(r'"pid":\s*(\d+)', line))]


async def _ready(admin: int, log: Path) -> None:
    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1):
                return bool(_shadow_pids(log))
        except OSError:
            return False

    await eventually(up, within=60)


async def test_every_arm_is_recorded_by_the_shadow_process(upstreams, redis_url, tmp_path: Path) -> None:
    """Through `serve` in process mode each request is answered, mirrored to the candidate and the A/A copy,
    and recorded with all three arms; the shadow process's counters show in the serving process's /metrics."""
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    log = tmp_path / "serve.log"
    process, port, admin = _serve(incumbent.url, candidate.url, redis_url, log)
    client_sync = redis.Redis.from_url(redis_url)
    try:
        await _ready(admin, log)
        async with aiohttp.ClientSession() as client:
            for index in range(20):
                async with client.post(f"http://127.0.0.1:{port}/v1/x", data=b'{"n": %d}' % index) as resp:
                    assert resp.status == 200
        await eventually(lambda: client_sync.xlen("{shadow}:records") >= 20, within=30)
        for record in records(client_sync):
            arms = record["meta"]["arms"]
            assert set(arms) == {"live", "shadow.candidate", "noise"}
            assert all(arm["status"] == 200 and arm["error"] is None for arm in arms.values())
            assert 0 <= arms["live"]["start_ms"] <= arms["live"]["end_ms"]
            assert orjson.loads(record["body.live"])["path"] == "/v1/x"
        assert _metric(admin, "shadow_proxy_mirrors_sent_total", target="candidate") == 20
        assert _metric(admin, "shadow_proxy_records_written_total") >= 20
    finally:
        client_sync.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0


async def test_killing_the_shadow_process_under_load_keeps_the_live_path_serving(
    upstreams, redis_url, tmp_path: Path
) -> None:
    """SIGKILL to the shadow process under load: every live request still answers 200, what it would have
    mirrored and recorded is counted as dropped (shadow_down), and a new shadow process takes over."""
    incumbent, candidate = await upstreams(echo), await upstreams(echo)
    log = tmp_path / "serve.log"
    process, port, admin = _serve(incumbent.url, candidate.url, redis_url, log)
    client_sync = redis.Redis.from_url(redis_url)
    statuses: list[int] = []
    killed = asyncio.Event()
    try:
        await _ready(admin, log)
        first = _shadow_pids(log)[0]

        async def load(client: aiohttp.ClientSession) -> None:
            while not killed.is_set() or len(_shadow_pids(log)) < 2 or len(statuses) < 400:
                async with client.post(f"http://127.0.0.1:{port}/v1/x", data=b"{}") as resp:
                    await resp.read()
                    statuses.append(resp.status)

        async with aiohttp.ClientSession() as client:
            loaders = [asyncio.create_task(load(client)) for _ in range(8)]
            await eventually(lambda: len(statuses) >= 200, within=30)
            os.kill(first, signal.SIGKILL)
            killed.set()
            await asyncio.wait_for(asyncio.gather(*loaders), timeout=90)
        assert set(statuses) == {200}
        assert _metric(admin, "shadow_proxy_loop_restarts_total", loop="shadow-process") == 1
        assert _metric(admin, "shadow_proxy_mirrors_skipped_total", target="candidate", reason="shadow_down") > 0
        assert _metric(admin, "shadow_proxy_records_dropped_total", reason="shadow_down") > 0
        # After the restart mirroring and recording resume: new requests are mirrored and recorded in full.
        before = client_sync.xlen("{shadow}:records")
        async with aiohttp.ClientSession() as client:
            for _ in range(10):
                async with client.post(f"http://127.0.0.1:{port}/v1/after", data=b"{}") as resp:
                    assert resp.status == 200
        await eventually(lambda: client_sync.xlen("{shadow}:records") >= before + 10, within=30)
        after = [r for r in records(client_sync) if r["meta"]["path"] == "/v1/after"]
        assert len(after) == 10 and all("shadow.candidate" in r["meta"]["arms"] for r in after)
    finally:
        client_sync.close()
        killed.set()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0

"""``shadow-proxy demo``: the whole loop on one machine in under a minute.

An embedded Redis, two sample OpenAI-compatible chat servers (the candidate a little slower, worded a
little differently and occasionally wrong), the proxy with noise sampling, a comparator, and traffic
with a progress bar; then the report and the dashboard URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..comparator.render import render
from ..comparator.report_loader import load_report
from ..comparator.report_model import Report
from ..comparator.worker import Worker
from ..config import Config, load_config
from ..server import ProxyServer
from .embedded_redis import EmbeddedRedis

PROMPTS = [
    "What is the capital of France?",
    "Summarise the plot of Hamlet in one sentence.",
    "Give me a haiku about autumn.",
    "How many legs does a spider have?",
    "Translate 'good morning' to Spanish.",
    "What is 12 times 12?",
    "Name a primary colour.",
    "Explain TCP in five words.",
]
ANSWERS = {
    "incumbent": [
        "Paris is the capital of France.",
        "A prince avenges his father and everyone dies.",
        "Leaves drift and fall / amber light on quiet paths / the year exhales slow",
        "A spider has eight legs.",
        "Buenos días.",
        "12 times 12 is 144.",
        "Red is a primary colour.",
        "Reliable ordered byte stream delivery.",
    ],
    "candidate": [
        "The capital of France is Paris.",
        "A prince avenges his father and everyone dies.",
        "Leaves drift and fall / amber light on quiet paths / the year exhales slow",
        "Spiders have eight legs.",
        "Buenos días.",
        "12 times 12 is 144.",
        "Blue is a primary colour.",
        "Reliable, ordered byte stream delivery.",
    ],
}


def model_app(arm: str, *, latency_ms: float, wrong_rate: float, error_rate: float, seed: int) -> web.Application:
    """A sample chat-completions server; streams when asked to, like an OpenAI-compatible server."""
    rng = random.Random(seed)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = str(body["messages"][-1]["content"])
        index = PROMPTS.index(prompt) if prompt in PROMPTS else 0
        await asyncio.sleep(rng.gauss(latency_ms, latency_ms / 8) / 1000)
        if rng.random() < error_rate:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        text = ANSWERS[arm][index]
        if rng.random() < wrong_rate:
            text = "I am not sure, but I think the answer is 42."
        usage = {"prompt_tokens": len(prompt) // 4 + 8, "completion_tokens": len(text) // 4 + 1}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": f"chatcmpl-{rng.getrandbits(32):x}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", arm),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in text.split(" "):
            chunk = {
                "object": "chat.completion.chunk",
                "model": body.get("model", arm),
                "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.002)
        done = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": usage,
        }
        await resp.write(b"data: " + orjson.dumps(done) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def demo_config(incumbent: str, candidate: str, redis_url: str) -> Config:
    price = {"input_per_1k": 0.5, "output_per_1k": 1.5}
    return load_config(
        None,
        environ={},
        overrides={
            "proxy": {"listen": "127.0.0.1:0", "log_level": "warning"},
            "admin": {"listen": "127.0.0.1:0"},
            "incumbent": {"url": incumbent, "price": price},
            "candidate": {"url": candidate, "price": {"input_per_1k": 0.4, "output_per_1k": 1.2}},
            "record": {"redis_url": redis_url},
            "compare": {"noise_sample_rate": 0.2, "window_seconds": 5, "block_ms": 200, "gates": {"min_pairs": 100}},
        },
    )


async def traffic(port: int, requests: int, rate: float, console: Console) -> int:
    """Send chat requests (a third streamed) at a steady rate with a progress bar; returns answers seen."""
    answered = 0
    rng = random.Random(1)
    semaphore = asyncio.Semaphore(32)
    columns = (TextColumn("traffic"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    async with aiohttp.ClientSession() as client:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("traffic", total=requests)

            async def one(i: int) -> None:
                nonlocal answered
                body = {
                    "model": "demo-model",
                    "stream": i % 3 == 0,
                    "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                }
                async with semaphore:
                    with contextlib.suppress(aiohttp.ClientError):
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        async with client.post(url, json=body, headers={"X-User-Id": f"user-{i % 50}"}) as resp:
                            await resp.read()
                            answered += 1
                progress.advance(task)

            pending = []
            for i in range(requests):
                pending.append(asyncio.create_task(one(i)))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*pending)
    return answered


async def run_demo(*, requests: int, rate: float, keep_running: bool, console: Console) -> Report:
    """Start everything, send traffic, compare, print the report; returns it."""
    with tempfile.TemporaryDirectory(prefix="shadow-proxy-demo-") as tmp:
        redis_server = EmbeddedRedis(Path(tmp) / "redis", persist=False)
        redis_url = await asyncio.to_thread(redis_server.start)
        try:
            incumbent_app = model_app("incumbent", latency_ms=40, wrong_rate=0.0, error_rate=0.0, seed=1)
            candidate_app = model_app("candidate", latency_ms=52, wrong_rate=0.03, error_rate=0.01, seed=2)
            async with serving(incumbent_app) as incumbent, serving(candidate_app) as candidate:
                config = demo_config(incumbent, candidate, redis_url)
                proxy = ProxyServer(config)
                await proxy.start()
                worker = Worker(config, redis_url)
                worker_task = asyncio.create_task(worker.run())
                try:
                    console.print(
                        f"proxy on http://127.0.0.1:{proxy.port}  (incumbent {incumbent}, "
                        f"candidate {candidate}, Redis {redis_url})"
                    )
                    answered = await traffic(proxy.port, requests, rate, console)
                    await _settle(proxy, worker, answered)
                    report = await load_report(config, redis_url, since_seconds=3600)
                    render(report, console)
                    console.print(
                        f"\ndashboard: http://127.0.0.1:{proxy.admin_port}/   "
                        f"report JSON: http://127.0.0.1:{proxy.admin_port}/api/report"
                    )
                    if keep_running:
                        console.print("the demo keeps running; press Ctrl-C to stop")
                        await asyncio.Event().wait()
                    return report
                finally:
                    worker.stop()
                    await worker_task
                    await worker.close()
                    await proxy.stop()
        finally:
            await asyncio.to_thread(redis_server.stop)


async def _settle(proxy: ProxyServer, worker: Worker, answered: int, within: float = 20.0) -> None:
    """Wait until every answered request is recorded and compared (bounded)."""
    metrics = proxy.runtime.metrics
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        written = metrics.value("shadow_proxy_records_written_total")
        dropped = sum(metrics.value("shadow_proxy_records_dropped_total", reason=r) for r in ("queue_full", "shutdown"))
        if written + dropped >= answered and worker.progress.read >= written:
            return
        await asyncio.sleep(0.1)

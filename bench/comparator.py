"""Comparator benchmark: pairs per second per worker, with one worker and with two.

Run from the repository root:

    .venv/bin/python bench/comparator.py            # full run, about 2 minutes on a quiet machine
    .venv/bin/python bench/comparator.py --quick    # smaller streams, one repeat, about 25 s (indicative only)

A real redis-server (``proxy.tools.embedded_redis.EmbeddedRedis``, no persistence) is started here. For
each workload the records stream ``{shadow}:records`` is filled with records built by the proxy's
own code (``Exchange``/``ArmCapture`` + ``Exchange.to_fields`` with the default ``Redactor``) and
written with the recorder's own pipelined ``XADD ... MAXLEN ~`` (``proxy.redis.RecordWriter``), so the
wire format cannot drift from what the proxy writes. Then ``proxy.comparator.worker.Worker`` runs in
burst mode (``run(burst=True)``) in 1 or 2 separate OS processes (multiprocessing, spawn) that join
one fresh consumer group; Redis is flushed and the stream refilled before every run.

Workloads:

* ``small``: a classifier endpoint, JSON bodies like ``{"label":"spam","score":0.93}`` in both
  arms, 10% of candidate answers differ (label or score beyond tolerance).
* ``chat``: OpenAI ``chat.completion`` objects with ~2,000 characters of content and a usage
  block; 20% of candidate answers differ by three words.

Timing: every worker process imports, builds its ``Worker`` and reports ready; then all start
together. ``wall`` runs from that start to the return of the last ``run(burst=True)``; it includes
the burst mode's final idle turn (one 0.2 s sleep) and final heartbeat. ``drain`` ends at the last
``XACK`` instead. pairs/s = pairs applied / wall. After each run the aggregates are checked: the
``n`` counters of ``{shadow}:agg:*`` and ``load_report(...).summary.pairs`` must both equal N.

Another benchmark (``bench/live_path.py``) may share this 2-core machine: before each measured run
this script waits (polling every 10 s, up to 10 minutes) until ``pgrep -f live_path.py`` finds
nothing, then up to 60 s for other processes to use less than 10% of a CPU. During each run it
measures the CPU the machine spent outside the workers, redis-server and itself (``/proc/stat``
minus their own CPU time); a run where that exceeded 10% of a CPU, or where live_path.py appeared,
is repeated (at most 2 more times per run, 6 over the whole benchmark) and otherwise kept and
marked disturbed.

Results: a table on stdout, JSON in ``bench/results/comparator-<timestamp>.json``, and the profile
of one single-worker run in ``bench/results/comparator-<timestamp>.prof``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import multiprocessing
import os
import platform
import pstats
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis
import uvloop

from proxy import logs
from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker
from proxy.config import Config, load_config
from proxy.exchange import ArmCapture, Exchange
from proxy.redaction import Redactor
from proxy.redis import Clients, Keys, RecordWriter
from proxy.tools.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
TARGET_SMALL_PAIRS_PER_WORKER = 5000.0
FILL_BATCH = 500  # records per pipelined XADD round trip while filling the stream
QUIET_POLL_SECONDS = 10.0
QUIET_MAX_SECONDS = 600.0
CHILD_READY_TIMEOUT = 120.0
CHILD_GO_TIMEOUT = QUIET_MAX_SECONDS + 120.0
RUN_TIMEOUT = 300.0
PROFILE_TOP = 15
WARMUP_N = 2000  # small-JSON records of one unmeasured first run (warms redis-server and the page cache)
OTHER_CPU_MAX_SHARE = 0.10  # a run during which other processes used more than 10% of a CPU is repeated
MAX_ATTEMPTS = 3
MAX_REPEATS_TOTAL = 6  # repeats over the whole benchmark, so a busy machine cannot stretch it much
IDLE_SAMPLE_S = 1.0
IDLE_WAIT_MAX_S = 60.0  # before each run, wait up to this long for other processes to go quiet
WAITED_S = [0.0]  # total time spent waiting for other processes, for the final line
PRICES = {
    "incumbent": {"price": {"input_per_1k": 0.00015, "output_per_1k": 0.0006}},
    "candidate": {"price": {"input_per_1k": 0.0001, "output_per_1k": 0.0004}},
}


@dataclass(frozen=True)
class Settings:
    small_n: int
    chat_n: int
    repeats: int  # measured runs per (workload, workers); the median is reported
    profile_n: int


FULL = Settings(small_n=20_000, chat_n=10_000, repeats=3, profile_n=5_000)
QUICK = Settings(small_n=4_000, chat_n=2_000, repeats=1, profile_n=2_000)


# ---------------------------------------------------------------------------------------------
# Records, built with the proxy's own code
# ---------------------------------------------------------------------------------------------

WORDS = (
    "the of and to in is that for it as with was on be by this are at from or an have not which but "
    "all can your more will one about when there their time out up use so what some other into than "
    "then its only new also after first two way because any these give day most us model answer "
    "request travel booking flight hotel city price refund ticket change seat luggage airport train "
    "schedule option policy customer account payment card delivery order return window weekend "
    "morning evening summer winter museum beach route station guide local dinner breakfast quiet "
    "central walking distance recommend consider usually typically available before arrival"
).split()

CLASSIFIER_PATH = "/v1/classify"
CHAT_PATH = "/v1/chat/completions"
SYSTEM_PROMPT = "You are a concise assistant for a travel company. Answer in plain prose."


def _sentence(rng: random.Random, low: int, high: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(low, high))
    return words[0].capitalize() + " " + " ".join(words[1:]) + "."


def _text(rng: random.Random, chars: int) -> str:
    """Plain sentences, about `chars` characters."""
    parts: list[str] = []
    size = 0
    while size < chars:
        sentence = _sentence(rng, 8, 18)
        parts.append(sentence)
        size += len(sentence) + 1
    return " ".join(parts)[:chars].rsplit(" ", 1)[0] + "."


def _change_words(rng: random.Random, text: str, count: int) -> str:
    """The same text with `count` words replaced by other words."""
    words = text.split(" ")
    for index in rng.sample(range(1, len(words) - 1), count):
        words[index] = rng.choice([w for w in WORDS if w != words[index]])
    return " ".join(words)


def _request_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _capture(
    upstream: str,
    role: str,
    cap: int,
    origin: float,
    *,
    send_after: float,
    ttfb: float,
    body: bytes,
    headers: list[tuple[str, str]],
    pieces: int,
    gap: float,
) -> ArmCapture:
    """One arm as the proxy captures it: request sent, headers, body chunks, end (monotonic seconds)."""
    arm = ArmCapture(upstream, role, cap, start=origin + send_after)
    arm.on_headers(200, headers, arm.start + ttfb)
    t = arm.start + ttfb + 0.00004
    step = math.ceil(len(body) / pieces)
    for k in range(pieces):
        arm.on_chunk(body[k * step : (k + 1) * step], t)
        t += gap
    arm.finish(t - gap)
    return arm


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


def small_exchange(rng: random.Random, index: int, wall: float, mono: float, cap: int) -> tuple[Exchange, bool]:
    """A spam classifier call mirrored to a candidate classifier; about 10% of answers differ."""
    request_id = _request_id(rng)
    body = orjson.dumps({"model": "spam-clf-v3", "input": _sentence(rng, 10, 28)})
    headers = [
        ("Host", "classifier.internal:8080"),
        ("User-Agent", "python-httpx/0.27.0"),
        ("Accept", "*/*"),
        ("Accept-Encoding", "gzip, deflate"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Authorization", "Bearer sk-live-0123456789abcdef"),
        ("X-Request-Id", request_id),
    ]
    label = "spam" if rng.random() < 0.3 else "ham"
    score = round(rng.uniform(0.55, 0.99), 2)
    differs = rng.random() < 0.10
    cand_label, cand_score = label, score
    if differs:
        if rng.random() < 0.5:
            cand_label, cand_score = ("ham" if label == "spam" else "spam"), round(1.0 - score, 2)
        else:
            cand_score = round(score - rng.uniform(0.05, 0.2), 2)
    exchange = Exchange(
        request_id=request_id,
        method="POST",
        path=CLASSIFIER_PATH,
        query="",
        route="/*",
        headers=headers,
        client_ip="10.0.3.17",
        received_wall=wall,
        received=mono,
        body=body,
    )
    for key, upstream, answer, send_after, median in (
        ("live", "incumbent", {"label": label, "score": score}, 0.00025, 0.011),
        ("shadow", "candidate", {"label": cand_label, "score": cand_score}, 0.00040, 0.013),
    ):
        payload = orjson.dumps(answer)
        response_headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Date", "Thu, 26 Nov 2026 15:00:00 GMT"),
            ("Server", "uvicorn"),
            ("X-Request-Id", request_id),
        ]
        arm = _capture(
            upstream,
            key,
            cap,
            mono,
            send_after=send_after,
            ttfb=_lognormal(rng, median, 0.3),
            body=payload,
            headers=response_headers,
            pieces=1,
            gap=0.0,
        )
        if key == "live":
            exchange.live = arm
        else:
            exchange.shadows.append(arm)
    return exchange, differs


def chat_exchange(
    rng: random.Random, index: int, wall: float, mono: float, cap: int, *, content_chars: int = 2000
) -> tuple[Exchange, bool]:
    """A non-streamed OpenAI chat completion (~2 KB of content by default); about 20% differ by a few words.

    ``content_chars`` sets the answer's length (bench/capacity.py sizes records with it)."""
    request_id = _request_id(rng)
    question = _text(rng, rng.randint(120, 320))
    body = orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
            "temperature": 0.2,
            "max_tokens": 800,
        }
    )
    headers = [
        ("Host", "llm-gateway.internal:8080"),
        ("User-Agent", "OpenAI/Python 1.54.4"),
        ("Accept", "application/json"),
        ("Accept-Encoding", "gzip, deflate"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Authorization", "Bearer sk-proj-0123456789abcdef"),
        ("X-Stainless-Lang", "python"),
        ("X-Stainless-Package-Version", "1.54.4"),
        ("X-Request-Id", request_id),
    ]
    content = _text(rng, content_chars)
    differs = rng.random() < 0.20
    cand_content = _change_words(rng, content, 3) if differs else content
    prompt_tokens = (len(SYSTEM_PROMPT) + len(question)) // 4 + 11
    exchange = Exchange(
        request_id=request_id,
        method="POST",
        path=CHAT_PATH,
        query="",
        route="/*",
        headers=headers,
        client_ip="10.0.3.17",
        received_wall=wall,
        received=mono,
        body=body,
    )
    for key, upstream, model, text, send_after, median in (
        ("live", "incumbent", "gpt-4o-mini-2024-07-18", content, 0.00030, 1.6),
        ("shadow", "candidate", "candidate-ft-2026-11", cand_content, 0.00045, 1.3),
    ):
        completion_tokens = len(text) // 4
        payload = orjson.dumps(
            {
                "id": f"chatcmpl-{_request_id(rng)[:29]}",
                "object": "chat.completion",
                "created": int(wall) + 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": "fp_0ba0d124f1",
            }
        )
        ttfb = _lognormal(rng, median, 0.35)
        response_headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Date", "Thu, 26 Nov 2026 15:00:00 GMT"),
            ("Openai-Processing-Ms", str(int(ttfb * 1000) - 3)),
            ("X-Request-Id", f"req_{_request_id(rng)}"),
            ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
        ]
        arm = _capture(
            upstream,
            key,
            cap,
            mono,
            send_after=send_after,
            ttfb=ttfb,
            body=payload,
            headers=response_headers,
            pieces=2,
            gap=0.0002,
        )
        if key == "live":
            exchange.live = arm
        else:
            exchange.shadows.append(arm)
    return exchange, differs


Builder = Callable[[random.Random, int, float, float, int], tuple[Exchange, bool]]


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    build: Builder
    interval: float  # seconds between request arrivals (the rate the backlog was recorded at)
    seed: int


WORKLOADS = (
    Workload("small", "small JSON", small_exchange, 0.002, 1),
    Workload("chat", "chat 2 KB", chat_exchange, 0.020, 2),
)


@dataclass
class Records:
    fields: list[dict[str, bytes]]
    divergent: int
    bytes: int


def build_records(workload: Workload, n: int, config: Config) -> Records:
    """n stream entries exactly as the recorder writes them (Exchange.to_fields, default redaction)."""
    rng = random.Random(workload.seed)
    redactor = Redactor(config.record)
    cap = int(config.record.max_body_bytes)
    start_wall = time.time() - n * workload.interval - 5.0
    fields: list[dict[str, bytes]] = []
    divergent = 0
    for index in range(n):
        exchange, differs = workload.build(rng, index, start_wall + index * workload.interval, 1000.0 + index, cap)
        divergent += differs
        fields.append(exchange.to_fields(redactor, cap))
    size = sum(len(k) + len(v) for entry in fields for k, v in entry.items())
    return Records(fields, divergent, size)


# ---------------------------------------------------------------------------------------------
# Configuration, Redis helpers
# ---------------------------------------------------------------------------------------------


def make_config(url: str, consumer: str = "", shards: int = 1) -> Config:
    compare: dict[str, Any] = {"consumer": consumer} if consumer else {}
    record = {"redis_url": url, "shards": shards}
    return load_config(None, environ={}, overrides={"record": record, "compare": compare, **PRICES})


def keys_of(config: Config) -> Keys:
    return Keys(config.record.namespace, config.record.stream, config.record.shards)


async def fill(url: str, config: Config, records: Records) -> float:
    """Append every record in batches (the recorder's RecordWriter); return the seconds spent."""
    if len(records.fields) > config.record.maxlen:
        raise SystemExit(
            f"N={len(records.fields)} exceeds record.maxlen={config.record.maxlen}: records would be trimmed"
        )
    clients = Clients(url, socket_timeout=30.0)
    store = RecordWriter(clients.get("records"), keys_of(config), maxlen=config.record.maxlen)
    # Field names as bytes, as the recorder hands them over (the writer reads b"request_id" to pick a shard).
    fields = [{k.encode() if isinstance(k, str) else k: v for k, v in f.items()} for f in records.fields]
    started = time.perf_counter()
    try:
        for offset in range(0, len(fields), FILL_BATCH):
            await store.append(fields[offset : offset + FILL_BATCH])
    finally:
        await clients.close()
    return time.perf_counter() - started


def redis_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")  # type: ignore[assignment]
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_stats(client: redis.Redis) -> dict[str, dict[str, float]]:
    info: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    out = {}
    for name, stats in info.items():
        if name.startswith("cmdstat_") and isinstance(stats, dict):
            out[name.removeprefix("cmdstat_")] = {"calls": int(stats["calls"]), "usec": int(stats["usec"])}
    return out


def verify(client: redis.Redis, config: Config, url: str, n: int) -> dict[str, Any]:
    """Pairs counted by the aggregates (raw hashes and the report) and what is left pending."""
    agg_n = 0.0
    agg_records = 0.0
    windows = 0
    pending_n = dead = 0
    for keys in keys_of(config).all_shards():  # one with record.shards = 1
        for key in client.scan_iter(match=f"{keys.tag}:agg:*", count=1000):
            values = client.hmget(key, ["n", "records"])
            agg_n += float(values[0] or 0)
            agg_records += float(values[1] or 0)
            windows += 1
        pending_n += int(client.xpending(keys.records, config.compare.group)["pending"])
        dead += int(client.xlen(keys.dead_letter))
    report = uvloop.run(load_report(config, url, since_seconds=86400)).as_json()
    summary = report["summary"]
    ok = int(agg_n) == n and int(summary["pairs"]) == n and pending_n == 0 and dead == 0
    return {
        "ok": ok,
        "expected": n,
        "agg_n": int(agg_n),
        "agg_records": int(agg_records),
        "agg_hashes": windows,
        "report_pairs": int(summary["pairs"]),
        "pending": pending_n,
        "dead_letter": int(dead),
        "divergence_rate": summary["divergence"]["candidate_rate"],
    }


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------

STORE_CALLS = ("ensure_group", "read_own_pending", "reclaim", "read_new", "apply", "ack", "pending_count", "heartbeat")


def _timed(
    original: Callable[..., Awaitable[Any]], name: str, spent: dict[str, float], marks: dict[str, float]
) -> Callable[..., Awaitable[Any]]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
            if name == "ack" and args and args[0]:
                marks["last_ack"] = time.monotonic()

    return timed


def instrument(worker: Worker) -> tuple[dict[str, float], dict[str, float]]:
    """Time every store call and the batch handler of this worker instance (nothing else changes)."""
    spent: dict[str, float] = {}
    marks: dict[str, float] = {"last_ack": 0.0}
    for name in STORE_CALLS:
        # Since the proxy/redis/ split (7b315ef) the worker's Redis calls live on two objects.
        owner = worker.aggregates if name == "apply" else worker.records
        setattr(owner, name, _timed(getattr(owner, name), name, spent, marks))
    worker._process = _timed(worker._process, "process", spent, marks)  # type: ignore[method-assign]
    return spent, marks


async def _burst(worker: Worker) -> Any:
    try:
        return await worker.run(burst=True)
    finally:
        await worker.close()


def run_instrumented(worker: Worker) -> dict[str, Any]:
    spent, marks = instrument(worker)
    cpu_started = time.process_time()
    started = time.monotonic()
    progress = uvloop.run(_burst(worker))
    ended = time.monotonic()
    return {
        "consumer": worker.consumer,
        "start": started,
        "end": ended,
        "last_ack": marks["last_ack"],
        "cpu_s": time.process_time() - cpu_started,
        "read": progress.read,
        "applied": progress.applied,
        "duplicates": progress.duplicates,
        "dead_lettered": progress.dead_lettered,
        "reclaimed": progress.reclaimed,
        "spent": spent,
    }


def child_main(url: str, consumer: str, results: Any, go: Any, shards: int = 1) -> None:
    """One comparator worker process: build the worker, report ready, wait for go, run one burst."""
    try:
        logs.configure("warning", "console")
        worker = Worker(make_config(url, consumer, shards), url)
        results.put(("ready", consumer, None))
        if not go.wait(CHILD_GO_TIMEOUT):
            results.put(("error", consumer, "no start signal"))
            return
        results.put(("done", consumer, run_instrumented(worker)))
    except BaseException as exc:  # report any failure to the parent instead of hanging it
        results.put(("error", consumer, f"{type(exc).__name__}: {exc}"))
        raise


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def wait_for_quiet() -> dict[str, Any]:
    """Wait until bench/live_path.py is not running (poll every 10 s, at most 10 minutes)."""
    waited = 0.0
    while True:
        if not live_path_running():
            return {"waited_s": waited, "disturbed": False}
        if waited >= QUIET_MAX_SECONDS:
            print(f"  ! live_path.py still running after {waited:.0f} s: measuring anyway (figures may be disturbed)")
            return {"waited_s": waited, "disturbed": True}
        if waited == 0:
            print("  waiting for bench/live_path.py to finish (polling every 10 s, up to 10 minutes) ...", flush=True)
        time.sleep(QUIET_POLL_SECONDS)
        waited += QUIET_POLL_SECONDS
        WAITED_S[0] += QUIET_POLL_SECONDS


def live_path_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "live_path.py"], capture_output=True, text=True, check=False)
    return found.returncode == 0 and found.stdout.strip() != ""


def system_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat, every CPU)."""
    with open("/proc/stat") as stat:
        values = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_idle_cpu() -> dict[str, float]:
    """Wait (up to IDLE_WAIT_MAX_S) until other processes use less than OTHER_CPU_MAX_SHARE of a CPU.

    Called while this benchmark's own processes are idle (workers waiting for the start signal)."""
    started = time.monotonic()
    while True:
        before = system_busy_s()
        time.sleep(IDLE_SAMPLE_S)
        share = (system_busy_s() - before) / IDLE_SAMPLE_S
        waited = time.monotonic() - started
        if share <= OTHER_CPU_MAX_SHARE or waited >= IDLE_WAIT_MAX_S:
            WAITED_S[0] += waited - IDLE_SAMPLE_S
            return {"waited_s": round(waited, 1), "busy_share": round(share, 3)}


def measured_run(
    ctx: Any,
    url: str,
    client: redis.Redis,
    config: Config,
    records: Records,
    workers: int,
    label: str,
    repeats: list[int],
) -> dict[str, Any]:
    """One measured run; repeated (up to MAX_ATTEMPTS, within the retry budget) when other processes
    took CPU during it."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        run = _attempt(ctx, url, client, config, records, workers, label)
        run["attempt"] = attempt
        if not run["disturbed"] or run["quiet"]["disturbed"]:  # no retry after a 10-minute wait ran out
            return run
        again = attempt < MAX_ATTEMPTS and repeats[0] < MAX_REPEATS_TOTAL
        repeats[0] += again
        print(
            f"  ! other processes used {run['other_cpu_share'] * 100:.0f}% of a CPU during that run"
            f"{' (live_path.py appeared)' if run['live_path_after'] else ''}"
            + (": repeating it" if again else ": keeping it, marked disturbed"),
            flush=True,
        )
        if not again:
            break
    return run


def _attempt(
    ctx: Any, url: str, client: redis.Redis, config: Config, records: Records, workers: int, label: str
) -> dict[str, Any]:
    n = len(records.fields)
    client.flushall()
    fill_s = uvloop.run(fill(url, config, records))
    results = ctx.Queue()
    go = ctx.Event()
    consumers = [f"bench-w{i + 1}" for i in range(workers)]
    shards = config.record.shards
    processes = [ctx.Process(target=child_main, args=(url, c, results, go, shards), name=c) for c in consumers]
    for process in processes:
        process.start()
    try:
        _collect(results, processes, "ready", CHILD_READY_TIMEOUT)
        quiet = wait_for_quiet()
        quiet["idle"] = wait_for_idle_cpu()
        client.config_resetstat()
        cpu_before = redis_cpu(client)
        load_before = os.getloadavg()[0]
        busy_before = system_busy_s()
        own_before = time.process_time()
        go.set()
        done = _collect(results, processes, "done", RUN_TIMEOUT)
        busy = system_busy_s() - busy_before
        own = time.process_time() - own_before
        redis_cpu_s = redis_cpu(client) - cpu_before
        stats = command_stats(client)
    finally:
        go.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
    parts = [done[c] for c in consumers]
    start = min(p["start"] for p in parts)
    wall = max(p["end"] for p in parts) - start
    drain = max(p["last_ack"] for p in parts) - start
    applied = sum(p["applied"] for p in parts)
    live_path_after = live_path_running()
    worker_cpu_s = sum(p["cpu_s"] for p in parts)
    # CPU the machine spent on anything but these workers, redis-server and this process, as a share of one CPU.
    other_share = max(0.0, busy - worker_cpu_s - redis_cpu_s - own) / wall
    disturbed = other_share > OTHER_CPU_MAX_SHARE or live_path_after or quiet["disturbed"]
    check = verify(client, config, url, n)
    check["ok"] = check["ok"] and applied == n and all(p["duplicates"] == 0 for p in parts)
    run = {
        "label": label,
        "workers": workers,
        "shards": shards,
        "n": n,
        "fill_s": fill_s,
        "wall_s": wall,
        "drain_s": drain,
        "applied": applied,
        "pairs_per_s": applied / wall,
        "pairs_per_s_per_worker": applied / wall / workers,
        "drain_pairs_per_s": applied / drain if drain > 0 else None,
        "worker_cpu_s": worker_cpu_s,
        "redis_cpu_s": redis_cpu_s,
        "machine_busy_cpu_s": busy,
        "other_cpu_share": other_share,
        "live_path_after": live_path_after,
        "disturbed": disturbed,
        "loadavg_1m_before": load_before,
        "quiet": quiet,
        "commandstats": stats,
        "per_worker": parts,
        "check": check,
    }
    share = ", ".join(f"{p['consumer']}={p['applied']}" for p in parts)
    print(
        f"  {label:<10} {workers} worker{'s' if workers > 1 else ' '}  wall {wall:6.2f} s  "
        f"{run['pairs_per_s']:8,.0f} pairs/s  (split {share}; other CPU {other_share * 100:.0f}%)  "
        f"check: agg n={check['agg_n']:,} report pairs={check['report_pairs']:,} expected={n:,} "
        f"pending={check['pending']} dead={check['dead_letter']} -> {'OK' if check['ok'] else 'MISMATCH'}",
        flush=True,
    )
    return run


def _collect(results: Any, processes: list[Any], kind: str, timeout: float) -> dict[str, Any]:
    """One message of `kind` from every child; fail fast when a child dies or reports an error."""
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(processes):
        try:
            message, consumer, payload = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p.name for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker process(es) {dead} died") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {kind} from workers") from None
            continue
        if message == "error":
            raise RuntimeError(f"worker {consumer} failed: {payload}")
        if message == kind:
            got[consumer] = payload
    return got


def profile_run(url: str, client: redis.Redis, config: Config, records: Records, prof_path: Path) -> dict[str, Any]:
    """One single-worker burst over the small-JSON stream under cProfile, in this process."""
    client.flushall()
    uvloop.run(fill(url, config, records))
    quiet = wait_for_quiet()
    quiet["idle"] = wait_for_idle_cpu()
    worker = Worker(make_config(url, "bench-profile"), url)
    profiler = cProfile.Profile()
    started = time.monotonic()
    profiler.enable()
    progress = uvloop.run(_burst(worker))
    profiler.disable()
    wall = time.monotonic() - started
    profiler.dump_stats(str(prof_path))
    texts = {}
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(PROFILE_TOP)
        texts[order] = _stats_table(out.getvalue())
    check = verify(client, config, url, len(records.fields))
    return {
        "n": len(records.fields),
        "applied": progress.applied,
        "wall_s_under_profiler": wall,
        "check": check,
        "quiet": quiet,
        "top_cumulative": texts["cumulative"],
        "top_tottime": texts["tottime"],
    }


def _stats_table(text: str) -> str:
    """pstats output from its column header on (the preamble names the run, not the functions)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith("ncalls"):
            return "\n".join(x.rstrip() for x in lines[index:] if x.strip())
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["pairs_per_s"] for r in runs]
    n = runs[0]["n"]
    workers = runs[0]["workers"]
    stats = [r["commandstats"] for r in runs]

    def usec(command: str) -> float:
        return statistics.median(s.get(command, {}).get("usec", 0) for s in stats)

    def spent(name: str) -> float:
        return statistics.median(sum(p["spent"].get(name, 0.0) for p in r["per_worker"]) for r in runs)

    process = spent("process")
    apply = spent("apply")
    ack = spent("ack")
    return {
        "workers": workers,
        "n": n,
        "repeats": len(runs),
        "wall_s": _median(runs, "wall_s"),
        "pairs_per_s": statistics.median(rates),
        "pairs_per_s_min": min(rates),
        "pairs_per_s_max": max(rates),
        "pairs_per_s_per_worker": statistics.median(rates) / workers,
        "drain_pairs_per_s": statistics.median(r["drain_pairs_per_s"] for r in runs),
        "checks_ok": all(r["check"]["ok"] for r in runs),
        "divergence_rate": runs[-1]["check"]["divergence_rate"],
        # microseconds per pair, summed over workers (CPU-ish cost, not wall time)
        "us_per_pair": {
            "worker_cpu": _median(runs, "worker_cpu_s") / n * 1e6,
            "redis_cpu": _median(runs, "redis_cpu_s") / n * 1e6,
            "parse_metrics": (process - apply - ack) / n * 1e6,
            "apply_call": apply / n * 1e6,
            "lua_in_redis": usec("evalsha") / n,
            "xreadgroup_in_redis": usec("xreadgroup") / n,
            "xack_in_redis": usec("xack") / n,
            "read_new_call": spent("read_new") / n * 1e6,
            "ack_call": ack / n * 1e6,
        },
        "evalsha_calls": statistics.median(s.get("evalsha", {}).get("calls", 0) for s in stats),
    }


def render(
    summaries: dict[str, dict[int, dict[str, Any]]],
    records: dict[str, Records],
    settings: Settings,
    meta: dict[str, Any],
) -> str:
    out: list[str] = []
    out.append(
        f"Comparator throughput: redis-server {meta['redis_version']}, {meta['cpus']} CPUs, "
        f"Python {meta['python']}, compare.batch_size {meta['batch_size']}, "
        f"median of {settings.repeats} run(s) per row"
    )
    out.append("")
    header = (
        f"{'workload':<11} {'N':>7} {'workers':>7} {'wall s':>7} {'pairs/s':>8} {'per worker':>10} "
        f"{'min-max pairs/s':>15} {'drain p/s':>9} {'vs 1 worker':>11}  {'pairs check (agg n / report)':<30}"
    )
    out.append(header)
    out.append("-" * len(header))
    for workload in WORKLOADS:
        by_workers = summaries[workload.key]
        one = by_workers[1]["pairs_per_s"]
        for workers in sorted(by_workers):
            s = by_workers[workers]
            verdict = "OK" if s["checks_ok"] else "MISMATCH"
            check = f"{s['n']:,} = {s['n']:,} x{s['repeats']} {verdict}"
            span = f"{s['pairs_per_s_min']:,.0f}-{s['pairs_per_s_max']:,.0f}"
            out.append(
                f"{workload.title:<11} {s['n']:>7,} {workers:>7} {s['wall_s']:>7.2f} {s['pairs_per_s']:>8,.0f} "
                f"{s['pairs_per_s_per_worker']:>10,.0f} {span:>15} {s['drain_pairs_per_s']:>9,.0f} "
                f"{s['pairs_per_s'] / one:>10.2f}x  {check:<30}"
            )
    out.append("")
    small1 = summaries["small"][1]["pairs_per_s"]
    chat1 = summaries["chat"][1]["pairs_per_s"]
    out.append(f"chat 2 KB vs small JSON, 1 worker: {chat1 / small1:.2f}x the pairs/s")
    for workload in WORKLOADS:
        rec = records[workload.key]
        s = summaries[workload.key][1]
        planted = rec.divergent / len(rec.fields)
        out.append(
            f"{workload.title}: {rec.bytes / len(rec.fields):,.0f} bytes per record; candidate divergence "
            f"measured {s['divergence_rate'] * 100:.2f}% vs planted {planted * 100:.2f}%"
        )
    out.append("")
    out.append("Where the time goes, 1 worker (microseconds per pair; 'in redis' = server-side time from INFO)")
    columns = (
        ("worker_cpu", "worker CPU"),
        ("parse_metrics", "parse+metrics"),
        ("apply_call", "apply() call"),
        ("lua_in_redis", "Lua in redis"),
        ("read_new_call", "XREADGROUP call"),
        ("xreadgroup_in_redis", "XREADGROUP in redis"),
        ("ack_call", "XACK call"),
        ("redis_cpu", "redis CPU"),
    )
    head = f"{'workload':<11} {'total':>7} " + " ".join(f"{title:>{max(9, len(title))}}" for _, title in columns)
    out.append(head)
    out.append("-" * len(head))
    for workload in WORKLOADS:
        s = summaries[workload.key][1]
        us = s["us_per_pair"]
        cells = " ".join(f"{us[key]:>{max(9, len(title))}.1f}" for key, title in columns)
        out.append(f"{workload.title:<11} {1e6 / s['pairs_per_s']:>7.1f} {cells}")
    out.append(
        "  total = wall time / pairs; parse+metrics = time in Worker._process outside apply() and ack() "
        "(parse_record + contribution);"
    )
    out.append(
        "  apply() call = building the Lua arguments + the pipelined EVALSHA round trip; Lua in redis is part of it."
    )
    out.append("")
    per_worker = summaries["small"][1]["pairs_per_s_per_worker"]
    per_worker_2 = summaries["small"].get(2, {}).get("pairs_per_s_per_worker")
    met = per_worker >= TARGET_SMALL_PAIRS_PER_WORKER
    out.append(
        f"Target: >= {TARGET_SMALL_PAIRS_PER_WORKER:,.0f} small JSON pairs/s per worker. "
        f"Measured 1 worker: {per_worker:,.0f} pairs/s ({per_worker / TARGET_SMALL_PAIRS_PER_WORKER:.2f}x target) "
        f"-> {'MET' if met else 'NOT MET'}"
        + (
            f"; 2 workers: {per_worker_2:,.0f} pairs/s per worker "
            f"({per_worker_2 / TARGET_SMALL_PAIRS_PER_WORKER:.2f}x target)"
            if per_worker_2
            else ""
        )
    )
    out.append(
        f"Other processes during the kept runs: at most {meta['other_cpu_share_max'] * 100:.0f}% of one CPU "
        f"(a run above {OTHER_CPU_MAX_SHARE * 100:.0f}% is repeated; {meta['repeated_runs']} run(s) were repeated)."
    )
    if meta["disturbed"]:
        out.append("WARNING: at least one kept run was disturbed by other processes: figures are not clean.")
    return "\n".join(out)


def scaling(args: argparse.Namespace) -> int:
    """1 worker reading 1 shard against 4 workers reading 4 shards, the same records, runs interleaved."""
    n = args.small or (20_000 if args.quick else 60_000)
    repeats = args.repeats or (1 if args.quick else 3)
    logs.configure("warning", "console")
    ctx = multiprocessing.get_context("spawn")
    cases = ((1, 1), (4, 4))
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="bench-comparator-") as tmp:
        server = EmbeddedRedis(Path(tmp), persist=False)
        url = server.start()
        client = redis.Redis.from_url(url, socket_timeout=60)
        try:
            records = build_records(WORKLOADS[0], n, make_config(url))
            print(f"{n:,} small-JSON records, {records.bytes / 1e6:.1f} MB; warm-up ...", flush=True)
            _attempt(ctx, url, client, make_config(url), Records(records.fields[:WARMUP_N], 0, 0), 1, "warm-up")
            budget = [0]
            for _ in range(repeats):
                for workers, shards in cases:
                    config = make_config(url, shards=shards)
                    label = f"{shards} shard{'s' if shards > 1 else ''}"
                    runs[(workers, shards)].append(
                        measured_run(ctx, url, client, config, records, workers, label, budget)
                    )
        finally:
            client.close()
            server.stop()
    print(f"\ncomparator scaling (bench/comparator.py --scaling), {os.cpu_count()} CPUs, median of {repeats}:")
    summary = {}
    for (workers, shards), rs in runs.items():
        rate = statistics.median(r["pairs_per_s"] for r in rs)
        worker_us = statistics.median(r["worker_cpu_s"] / r["applied"] * 1e6 for r in rs)
        redis_us = statistics.median(r["redis_cpu_s"] / r["applied"] * 1e6 for r in rs)
        ok = all(r["check"]["ok"] for r in rs)
        disturbed = any(r["disturbed"] for r in rs)
        summary[f"{workers}w{shards}s"] = {"pairs_per_s": rate, "worker_us": worker_us, "redis_us": redis_us}
        print(
            f"  {workers} worker(s) on {shards} shard(s): {rate:8,.0f} pairs/s, worker CPU {worker_us:6.1f} us/pair, "
            f"redis CPU {redis_us:5.1f} us/pair, totals {'exact' if ok else 'MISMATCH'}"
            + ("  [disturbed]" if disturbed else "")
        )
    ratio = summary["4w4s"]["pairs_per_s"] / summary["1w1s"]["pairs_per_s"]
    cpu_ceiling = (os.cpu_count() or 1) * 1e6 / (summary["4w4s"]["worker_us"] + summary["4w4s"]["redis_us"])
    print(
        f"  4 workers on 4 shards / 1 worker on 1 shard: {ratio:.2f}x (target >= 3x); this machine's ceiling at the "
        f"measured per-pair cost: {cpu_ceiling:,.0f} pairs/s = "
        f"{cpu_ceiling / summary['1w1s']['pairs_per_s']:.2f}x one worker"
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"comparator-scaling-{stamp}.json"
    out.write_text(
        json.dumps(
            {"summary": summary, "ratio": ratio, "runs": {f"{w}w{s}s": rs for (w, s), rs in runs.items()}},
            default=str,
            indent=1,
        )
    )
    print(f"  results: {out}")
    return 0 if all(r["check"]["ok"] for rs in runs.values() for r in rs) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller streams and one repeat (under a minute)")
    parser.add_argument("--small", type=int, metavar="N", help="small-JSON records (overrides the preset)")
    parser.add_argument("--chat", type=int, metavar="N", help="chat records (overrides the preset)")
    parser.add_argument("--repeats", type=int, metavar="R", help="measured runs per row (overrides the preset)")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="issue 12's target instead: 1 worker on 1 shard against 4 workers on 4 shards (small-JSON records)",
    )
    args = parser.parse_args()
    if args.scaling:
        return scaling(args)
    settings = QUICK if args.quick else FULL
    settings = Settings(
        small_n=args.small or settings.small_n,
        chat_n=args.chat or settings.chat_n,
        repeats=args.repeats or settings.repeats,
        profile_n=min(settings.profile_n, args.small or settings.profile_n),
    )
    logs.configure("warning", "console")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ctx = multiprocessing.get_context("spawn")
    began = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="bench-comparator-") as tmp:
        server = EmbeddedRedis(Path(tmp), persist=False)
        url = server.start()
        client = redis.Redis.from_url(url, socket_timeout=60)
        try:
            config = make_config(url)
            redis_version = str(client.info("server")["redis_version"])
            print(f"redis-server {redis_version} at {url}; building records ...", flush=True)
            records: dict[str, Records] = {}
            sizes = {"small": settings.small_n, "chat": settings.chat_n}
            for workload in WORKLOADS:
                started = time.perf_counter()
                records[workload.key] = build_records(workload, sizes[workload.key], config)
                print(
                    f"  {workload.title}: {sizes[workload.key]:,} records, "
                    f"{records[workload.key].bytes / 1e6:.1f} MB, built in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
            runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
            print("warm-up run (not kept) ...", flush=True)
            warm = Records(records["small"].fields[:WARMUP_N], 0, 0)
            _attempt(ctx, url, client, config, warm, 1, "warm-up")
            print("measuring ...", flush=True)
            repeats = [0]
            for workload in WORKLOADS:
                runs[workload.key] = {1: [], 2: []}
                for _ in range(settings.repeats):
                    for workers in (1, 2):  # interleaved, so slow drift affects both alike
                        runs[workload.key][workers].append(
                            measured_run(
                                ctx, url, client, config, records[workload.key], workers, workload.key, repeats
                            )
                        )
            print("profiling one single-worker small-JSON run ...", flush=True)
            profile_records = build_records(WORKLOADS[0], settings.profile_n, config)
            prof_path = RESULTS_DIR / f"comparator-{stamp}.prof"
            profile = profile_run(url, client, config, profile_records, prof_path)
        finally:
            client.close()
            server.stop()

    summaries = {key: {w: summarise(rs) for w, rs in by.items()} for key, by in runs.items()}
    all_runs = [r for by in runs.values() for rs in by.values() for r in rs]
    meta = {
        "redis_version": redis_version,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "batch_size": config.compare.batch_size,
        "disturbed": any(r["disturbed"] for r in all_runs),
        "other_cpu_share_max": max(r["other_cpu_share"] for r in all_runs),
        "repeated_runs": sum(r["attempt"] - 1 for r in all_runs),
    }
    table = render(summaries, records, settings, meta)
    print()
    print(table)
    print()
    print(
        f"cProfile, 1 worker, small JSON, N={profile['n']:,} "
        f"(wall {profile['wall_s_under_profiler']:.2f} s under the profiler, "
        f"check {'OK' if profile['check']['ok'] else 'MISMATCH'}), top {PROFILE_TOP} by cumulative time:"
    )
    print(profile["top_cumulative"])
    print()
    print(f"top {PROFILE_TOP} by internal time:")
    print(profile["top_tottime"])
    result_path = RESULTS_DIR / f"comparator-{stamp}.json"
    document = {
        "benchmark": "comparator",
        "time": stamp,
        "quick": args.quick,
        "settings": settings.__dict__,
        "target_small_pairs_per_s_per_worker": TARGET_SMALL_PAIRS_PER_WORKER,
        "target_met": summaries["small"][1]["pairs_per_s_per_worker"] >= TARGET_SMALL_PAIRS_PER_WORKER,
        "machine": {**meta, "platform": platform.platform(), "loadavg": os.getloadavg()},
        "compare_config": config.compare.model_dump(mode="json"),
        "records": {
            k: {"n": len(r.fields), "bytes": r.bytes, "planted_divergent": r.divergent} for k, r in records.items()
        },
        "summary": summaries,
        "runs": runs,
        "profile": {**profile, "prof_file": str(prof_path.relative_to(ROOT))},
        "table": table,
        "elapsed_s": time.monotonic() - began,
        "waited_for_other_processes_s": WAITED_S[0],
    }
    result_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print()
    print(
        f"results: {result_path.relative_to(ROOT)} (elapsed {time.monotonic() - began:.0f} s, of which "
        f"{WAITED_S[0]:.0f} s waiting for other processes to finish or go quiet)"
    )
    ok = all(r["check"]["ok"] for r in all_runs) and profile["check"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

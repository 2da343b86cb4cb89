"""Redis outages under load: what the live path, the recorder and the comparator lose, per recorder mode.

Run from the repository root:

    .venv/bin/python bench/redis_outage.py  # both scenarios, about 2 minutes (--rate, --outage, --scenarios)

Per scenario, fresh processes: two upstreams, redis-server with AOF on one port, ``python -m proxy serve``
and one ``python -m proxy compare``. Open-loop POSTs at --rate; Redis down at 3 s for --outage s, then twice for
0.5 s (2 s apart), then 5 s more load. Waits (60 s at most) until every answer is a record written or dropped
and the comparator has acked all, then prints a markdown table. Scenarios: memory (the memory queue only) and
spool (record.spool_dir set).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import logs  # noqa: E402
from proxy.tools.embedded_redis import EmbeddedRedis, free_port  # noqa: E402

HOST = "127.0.0.1"
SETTLE_SECONDS = 60.0
SCENARIOS = ("memory", "spool")
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)
_REASON = re.compile(r'reason="([^"]*)"')


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Load:
    """Open loop: request i is sent at t0 + i/rate whatever happened before; answers counted by status."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.interval = url, 1.0 / rate
        self.statuses, self.errors = collections.Counter[int](), collections.Counter[str]()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Until `stopping` is set; returns once every request sent has its answer or error (30 s at most)."""
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=0)
        )
        async with session, asyncio.TaskGroup() as requests:
            start, sent = time.monotonic(), 0
            while not self.stopping.is_set():
                requests.create_task(self._one(session, sent))
                sent += 1
                pause = start + sent * self.interval - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), max(0.0, pause))

    async def _one(self, session: aiohttp.ClientSession, index: int) -> None:
        body = {"model": "bench", "messages": [{"role": "user", "content": f"hello {index}"}]}
        try:
            async with session.post(self.url, json=body) as response:
                await response.read()
                self.statuses[response.status] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[type(exc).__name__] += 1


@dataclass
class Stack:
    """One scenario's processes: upstreams, Redis, the proxy, a comparator worker."""

    workdir: Path
    spool: bool
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    http: aiohttp.ClientSession = field(init=False)
    db: aioredis.Redis = field(init=False)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.redis = EmbeddedRedis(self.workdir / "redis", port=free_port(), persist=True)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with (self.workdir / f"{name}.log").open("ab") as out:  # the child's output, kept for a failed run
            self.procs.append(subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
                preexec_fn=_die_with_parent,
            ))  # fmt: skip

    async def start(self) -> None:
        self.redis.start()
        upstreams = []
        for name in ("incumbent", "candidate"):
            port = free_port()
            self.spawn(name, [sys.executable, str(ROOT / "bench" / "live_path.py"), "_upstream", "--port", str(port)])
            upstreams.append(f"http://{HOST}:{port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOW_PROXY_")}
        env |= {"SHADOW_PROXY_RECORD_SOCKET_TIMEOUT": "0.5", "SHADOW_PROXY_COMPARE_NOISE_SAMPLE_RATE": "0"}
        if self.spool:
            env["SHADOW_PROXY_RECORD_SPOOL_DIR"] = str(self.workdir / "spool")
        serve = ["serve", "--listen", f"{HOST}:{self.port}", "--admin-listen", f"{HOST}:{self.admin_port}"]
        serve += ["--incumbent", upstreams[0], "--candidate", upstreams[1], "--redis-url", self.redis.url]
        self.spawn("proxy", [sys.executable, "-m", "proxy", *serve], env)
        self.spawn("compare", [sys.executable, "-m", "proxy", "compare", "--redis-url", self.redis.url], env)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of its process group
        self.redis.stop()


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
        return await response.read()


async def observe(stack: Stack) -> dict[str, Any]:
    """The proxy's counters, its loops, and the comparator's progress and health, right now."""
    admin, client = f"http://{HOST}:{stack.admin_port}", stack.db
    samples = _SAMPLE.findall((await _get(stack.http, f"{admin}/metrics")).decode())
    dropped = collections.Counter[str]()
    for name, labels, value in samples:
        if name == "shadow_proxy_records_dropped_total" and (reason := _REASON.search(labels)) and float(value):
            dropped[reason.group(1)] += int(float(value))
    written = sum(int(float(v)) for n, _, v in samples if n == "shadow_proxy_records_written_total")
    loops = orjson.loads(await _get(stack.http, f"{admin}/readyz")).get("loops", {})
    seq = int(await client.get("{shadow}:records:seq") or 0)
    delivered = int(await client.hget("{shadow}:records:delivered", "comparators") or 0)
    pending = await client.xpending("{shadow}:records", "comparators") if seq else {"pending": 0}
    workers = [orjson.loads(await client.get(key) or b"{}") async for key in client.scan_iter("{shadow}:worker:*")]
    return {
        "written": written, "dropped": dict(dropped), "lag": seq - delivered, "pending": int(pending["pending"]),
        "loops_ok": bool(loops) and all(loop["ok"] for loop in loops.values()),
        "comparator_ok": bool(workers) and all(w.get("health", {}).get("ok") for w in workers),
    }  # fmt: skip


async def stream_and_aggregates(client: aioredis.Redis) -> tuple[int, int, int]:
    """(entries in the records stream, distinct request ids among them, sum of n over the aggregates)."""
    entries, ids, start = 0, set[bytes](), "-"
    while batch := list[Any](await client.xrange("{shadow}:records", min=start, count=2000) or []):
        entries += len(batch)
        ids.update(fields[b"request_id"] for _, fields in batch)
        start = "(" + batch[-1][0].decode()
    n = [float(await client.hget(key, "n") or 0) async for key in client.scan_iter("{shadow}:agg:*")]
    return entries, len(ids), int(sum(n))


async def outages(redis: EmbeddedRedis, outage: float) -> None:
    for i, down in enumerate((outage, 0.5, 0.5)):
        await asyncio.sleep(2.0 if i else 0.0)
        log(f"redis down for {down:g} s")
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(down)
        await asyncio.to_thread(redis.start)


async def poll(stack: Stack, ok: Callable[[dict[str, Any]], bool], within: float) -> tuple[dict[str, Any], float]:
    """Observe until ok(observation) or `within` seconds: (the last observation, seconds taken)."""
    started, now = time.monotonic(), dict[str, Any]()
    while time.monotonic() - started <= within:
        if any(p.poll() is not None for p in stack.procs):
            raise RuntimeError(f"a child process exited: see the logs in {stack.workdir}")
        with contextlib.suppress(OSError, aiohttp.ClientError, ValueError, TimeoutError, aioredis.RedisError):
            now = await observe(stack)
            if ok(now):
                break
        await asyncio.sleep(0.5)
    return now, time.monotonic() - started


def healthy(now: dict[str, Any]) -> bool:
    return bool(now) and now["loops_ok"] and now["comparator_ok"]


async def scenario(name: str, rate: float, outage: float, workdir: Path) -> dict[str, Any]:
    stack = Stack(workdir / name, spool=name == "spool")
    stack.workdir.mkdir(parents=True)
    try:
        await stack.start()
        async with aiohttp.ClientSession() as stack.http, aioredis.Redis.from_url(stack.redis.url) as stack.db:
            if not healthy((await poll(stack, healthy, 30))[0]):
                raise RuntimeError(f"{name}: the proxy's loops or the comparator not up in 30 s: see {stack.workdir}")
            load = Load(f"http://{HOST}:{stack.port}/v1/chat/completions", rate)
            runner = asyncio.create_task(load.run())
            await asyncio.sleep(3.0)
            await outages(stack.redis, outage)
            await asyncio.sleep(5.0)
            load.stopping.set()
            await runner
            answered = sum(load.statuses.values())
            log(f"{name}: {answered} answered; waiting for records and the comparator (at most {SETTLE_SECONDS:g} s)")

            def settled(now: dict[str, Any]) -> bool:
                accounted = now["written"] + sum(now["dropped"].values()) == answered
                return accounted and now["lag"] == 0 and now["pending"] == 0 and healthy(now)

            now, seconds = await poll(stack, settled, SETTLE_SECONDS)
            entries, distinct, aggregated = await stream_and_aggregates(stack.db)
    finally:
        stack.stop()
    return {
        "scenario": name, "rate": rate, "outage": outage, "answered": answered, "duplicates": entries - distinct,
        "live_errors": sum(n for s, n in load.statuses.items() if s != 200) + sum(load.errors.values()),
        "statuses": dict(load.statuses), "transport_errors": dict(load.errors), **now, "entries": entries,
        "distinct": distinct, "aggregated": aggregated, "settled_s": seconds, "drained": bool(now) and settled(now),
    }  # fmt: skip


def render(rows: list[dict[str, Any]]) -> str:
    def ratio(x: int, answered: int) -> str:
        return f"{x / answered:.4f}" if answered else "n/a"

    lines = [
        "| scenario | rate req/s | outage s | answered | live errors | records written | records dropped "
        "| records ÷ answered | distinct ids ÷ answered | aggregates ÷ answered | loops ok | comparator ok "
        "| settled in |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(r["dropped"].items())) or "0"
        settled = f"{r['settled_s']:.1f} s" if r["drained"] else f"NOT in {SETTLE_SECONDS:g} s"
        lines.append(
            f"| {r['scenario']} | {r['rate']:g} | {r['outage']:g} | {r['answered']} | {r['live_errors']} "
            f"| {r['written']} | {dropped} | {ratio(r['written'], r['answered'])} "
            f"| {ratio(r['distinct'], r['answered'])} | {ratio(r['aggregated'], r['answered'])} "
            f"| {'yes' if r['loops_ok'] else 'NO'} | {'yes' if r['comparator_ok'] else 'NO'} | {settled} |"
        )
    keys = ("entries", "distinct", "duplicates", "aggregated", "lag", "pending", "statuses", "transport_errors")
    notes = [f"{r['scenario']}: " + ", ".join(f"{key} {r[key]}" for key in keys) for r in rows]
    return "\n".join([*lines, "", *notes])


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="redis-outage-bench-") as tmp:
        return [await scenario(name, args.rate, args.outage, Path(tmp)) for name in args.scenarios.split(",")]


def code_version() -> tuple[str, str]:
    """(the commit, with a mark if proxy/ has uncommitted changes; a digest of proxy/'s source)."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "proxy"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sorted((ROOT / "proxy").rglob("*.py"))))
    return f"{commit or '?'}{' + uncommitted changes in proxy/' if dirty.strip() else ''}", digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second (default 200)")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds of the first, long outage (default 10)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: memory, spool")
    args = parser.parse_args()
    if unknown := set(args.scenarios.split(",")) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    logs.configure("warning", "console")  # EmbeddedRedis logs through structlog: keep stdout for the table
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # finally-blocks stop the children
    commit, digest = code_version()
    rows = uvloop.run(main_async(args))
    if code_version()[1] != digest:
        commit += " (WARNING: proxy/ changed during the run)"
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, commit {commit}")
    print(render(rows))
    return 0 if all(r["drained"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

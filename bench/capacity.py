"""Capacity: what one Redis node, one comparator worker and one proxy process carry, measured here.

Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python bench/capacity.py --quick   # about 70 s, one run per row (indicative)
    PYTHONPATH=$PWD .venv/bin/python bench/capacity.py           # 6 to 10 minutes: 3 runs per row, 2 workers too
    PYTHONPATH=$PWD .venv/bin/python bench/capacity.py --replan bench/results/capacity-<stamp>.json \
        --pairs-per-record 0.1 --retention 600                  # the model again, other assumptions, no measuring

Measured with real processes on 127.0.0.1 (docs/scaling.md turns the figures into a capacity model):

a. **Redis node** (one ``redis-server`` from ``proxy.tools.embedded_redis.EmbeddedRedis``, no persistence unless
   ``--aof``): the records stream is filled to ``maxlen`` with records built by the proxy's own
   ``Exchange.to_fields`` (default ``Redactor``), which gives ``used_memory`` per retained record (INFO memory
   before/after, ``XLEN`` known). Then 1 and 2 writer processes, each one ``proxy.redis.RecordWriter`` appending
   batches of ``record.batch_size`` one after the other (as the recorder's single writer task does), run for a
   fixed time on the full stream, so every ``XADD ... MAXLEN ~`` also trims: records/s, bytes/s, redis-server's
   CPU per record (``/proc/<pid>/stat``), bytes received per record (INFO ``total_net_input_bytes``), and the
   writers' own CPU per record (what the proxy's recorder spends on the Redis write).
b. **Comparator worker**: ``bench/comparator.py``'s ``measured_run`` (imported, not copied) drains N records of
   the same size with 1 worker (and 2 in the full run): pairs/s, worker CPU per pair, redis-server CPU per pair.
c. **Proxy process**: not re-measured. The req/s and CPU per request of one process come from
   docs/performance.md's top table (``PROXY_*`` below, with their date and commit); this script adds what grows
   with the record size on the proxy: ``Exchange.to_fields`` per record (timed in-process) and the writer CPU
   per record from (a).

Record sizes: ``small`` is the smallest realistic record (a classifier call with the headers an SDK sends: the
JSON ``meta`` field alone is ~1.6 KB, so ~1 KB records do not occur); ``4k`` and ``32k`` are OpenAI chat
completions whose answer length is chosen so the whole entry is about 4 KB and 32 KB (long LLM answers).

Background load: before every run the script waits (up to 20 s) for the machine to go quiet; during the run it
measures the CPU spent outside its own processes (``/proc/stat`` minus redis-server, the writers and itself). A
run where that exceeded 10% of a CPU is repeated (full run: at most twice, and only in the first 9 minutes;
quick: never) and otherwise kept and marked disturbed.

``record.shards`` exists, but this script measures one stream: ``--shards N`` is not implemented here yet
(``bench/comparator.py --scaling`` measures workers across shards). ``record_keys`` and ``stream_keys`` are the two
places that name the layout; ``--shards N`` means: build ``Keys(..., shards=N)`` in ``record_keys``, return every
shard's stream from ``stream_keys`` (memory and XLEN are summed over them) and, on a cluster, read CPU per node.

Results: a table on stdout and JSON in ``bench/results/capacity-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import comparator  # noqa: E402
from proxy import logs  # noqa: E402
from proxy.config import Config  # noqa: E402
from proxy.redaction import Redactor  # noqa: E402
from proxy.redis import Clients, Keys, RecordWriter  # noqa: E402
from proxy.tools.embedded_redis import EmbeddedRedis  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"

# (c) One proxy process, cited from docs/performance.md ("Against a naive aiohttp proxy (issue 11 targets)",
# inline, fast candidate, one worker pinned to core 0, wrk -c32; 2026-12-02 03:30-03:39 UTC, code 4284aa8,
# this 2-core VM). Request 96 bytes, answer a small JSON, mirroring and recording on: a record of the
# `small` size class.
PROXY_REQ_S = 3566.0
PROXY_CPU_US = 273.0
PROXY_SOURCE = "docs/performance.md top table (inline, fast candidate), 2026-12-02, code 4284aa8"

OTHER_CPU_MAX_SHARE = 0.10
BUDGET_S = {True: 110.0, False: 540.0}  # quick, full: past this, disturbed runs are kept (marked), not repeated
DEADLINE = [math.inf]  # monotonic time after which nothing is repeated
POOL = 512  # distinct records each writer cycles through
CHILD_TIMEOUT = 120.0


@dataclass(frozen=True)
class Size:
    key: str
    title: str
    target_bytes: int  # 0: the classifier record as built (the smallest realistic size)


SIZES = (Size("small", "small (~2 KB)", 0), Size("4k", "chat ~4 KB", 4096), Size("32k", "chat ~32 KB", 32768))


@dataclass(frozen=True)
class Settings:
    duration_s: float  # each write run
    repeats: int  # write runs per (size, writers); the median is kept
    writers: tuple[int, ...]
    maxlen: dict[str, int]  # stream length per size (filled first, then kept there by MAXLEN ~)
    compare_n: dict[str, int]
    compare_workers: tuple[int, ...]
    compare_repeats: int
    attempts: int  # a disturbed run is repeated up to attempts - 1 times
    idle_wait_s: float  # before each run, wait up to this long for other processes to go quiet


QUICK = Settings(
    duration_s=3.0,
    repeats=1,
    writers=(1, 2),
    maxlen={"small": 20_000, "4k": 10_000, "32k": 2_000},
    compare_n={"small": 6_000, "4k": 4_000, "32k": 800},
    compare_workers=(1,),
    compare_repeats=1,
    attempts=1,
    idle_wait_s=5.0,
)
FULL = Settings(
    duration_s=8.0,
    repeats=3,
    writers=(1, 2),
    maxlen={"small": 100_000, "4k": 50_000, "32k": 10_000},
    compare_n={"small": 10_000, "4k": 6_000, "32k": 1_500},
    compare_workers=(1, 2),
    compare_repeats=2,
    attempts=3,
    idle_wait_s=20.0,
)


# ---------------------------------------------------------------------------------------------
# Layout: the two places that change with record.shards
# ---------------------------------------------------------------------------------------------


def record_keys(config: Config, shards: int = 1) -> Keys:
    """The deployment's keys. Today one stream; with record.shards: Keys(..., shards=shards)."""
    if shards != 1:
        raise SystemExit("--shards is not implemented in bench/capacity.py yet (see its docstring)")
    return Keys(config.record.namespace, config.record.stream)


def stream_keys(keys: Keys) -> list[str]:
    """Every records stream of the layout (one today; one per shard with record.shards)."""
    return [keys.records]


# ---------------------------------------------------------------------------------------------
# Records of a given size, built with the proxy's own code (bench/comparator.py's builders)
# ---------------------------------------------------------------------------------------------


def entry_bytes(fields: dict[str, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


def _chat_size(chars: int, config: Config) -> float:
    workload = comparator.Workload("x", "x", functools.partial(comparator.chat_exchange, content_chars=chars), 0.02, 7)
    built = comparator.build_records(workload, 20, config)
    return built.bytes / len(built.fields)


def workload_for(size: Size, config: Config) -> tuple[comparator.Workload, int]:
    """The bench/comparator.py workload whose records are about size.target_bytes (and its answer length)."""
    if not size.target_bytes:
        return comparator.Workload(size.key, size.title, comparator.small_exchange, 0.002, 11), 0
    low, high = 400, 4000  # the entry grows by about 2 bytes per answer character (two arms)
    s_low, s_high = _chat_size(low, config), _chat_size(high, config)
    chars = max(200, round(low + (size.target_bytes - s_low) * (high - low) / (s_high - s_low)))
    build = functools.partial(comparator.chat_exchange, content_chars=chars)
    return comparator.Workload(size.key, size.title, build, 0.02, 12), chars


def as_bytes(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    """As the recorder sends them (proxy/recorder.py encodes the field names)."""
    return {k.encode(): v for k, v in fields.items()}


# ---------------------------------------------------------------------------------------------
# Measuring the machine and redis-server
# ---------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (/proc/<pid>/stat), seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_s: float) -> dict[str, float]:
    """Up to max_s for other processes to use less than OTHER_CPU_MAX_SHARE of a CPU."""
    started = time.monotonic()
    while True:
        before = comparator.system_busy_s()
        time.sleep(1.0)
        share = comparator.system_busy_s() - before
        if share <= OTHER_CPU_MAX_SHARE or time.monotonic() - started >= max_s:
            return {"waited_s": round(time.monotonic() - started, 1), "busy_share": round(share, 3)}


def info_int(client: redis.Redis, section: str, name: str) -> int:
    info: dict[str, Any] = client.info(section)  # type: ignore[assignment]
    return int(info[name])


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
        "loadavg_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------
# (a) Writers
# ---------------------------------------------------------------------------------------------


async def fill(url: str, keys: Keys, maxlen: int, entries: list[dict[bytes, bytes]], n: int, batch: int) -> None:
    """Append n records (cycling through entries) with the recorder's RecordWriter."""
    clients = Clients(url, socket_timeout=60.0)
    writer = RecordWriter(clients.get("records"), keys, maxlen=maxlen)
    try:
        for offset in range(0, n, batch):
            count = min(batch, n - offset)
            await writer.append([entries[(offset + i) % len(entries)] for i in range(count)])
    finally:
        await clients.close()


async def _write_for(url: str, keys: Keys, maxlen: int, pool: list[dict[bytes, bytes]], batch: int, seconds: float):
    clients = Clients(url, socket_timeout=60.0)
    writer = RecordWriter(clients.get("records"), keys, maxlen=maxlen)
    sizes = [sum(len(k) + len(v) for k, v in f.items()) for f in pool]
    records = nbytes = cursor = 0
    try:
        cpu0, start = time.process_time(), time.monotonic()
        while time.monotonic() - start < seconds:
            chunk = [pool[(cursor + i) % len(pool)] for i in range(batch)]
            await writer.append(chunk)
            nbytes += sum(sizes[(cursor + i) % len(pool)] for i in range(batch))
            cursor += batch
            records += batch
        end = time.monotonic()
        return {"start": start, "end": end, "records": records, "bytes": nbytes, "cpu_s": time.process_time() - cpu0}
    finally:
        await clients.close()


def writer_main(
    url: str, size: Size, seed: int, maxlen: int, batch: int, seconds: float, results: Any, go: Any
) -> None:
    """One writer process: build its own pool of records, report ready, wait for go, append for `seconds`."""
    name = f"writer-{seed}"
    try:
        logs.configure("warning", "console")
        config = comparator.make_config(url)
        workload, _ = workload_for(size, config)
        workload = comparator.Workload(workload.key, workload.title, workload.build, workload.interval, seed)
        pool = [as_bytes(f) for f in comparator.build_records(workload, POOL, config).fields]
        keys = record_keys(config)
        results.put(("ready", name, None))
        if not go.wait(CHILD_TIMEOUT):
            results.put(("error", name, "no start signal"))
            return
        results.put(("done", name, uvloop.run(_write_for(url, keys, maxlen, pool, batch, seconds))))
    except BaseException as exc:
        results.put(("error", name, f"{type(exc).__name__}: {exc}"))
        raise


def write_run(
    ctx: Any, url: str, client: redis.Redis, redis_pid: int, size: Size, writers: int, maxlen: int, s: Settings
) -> dict[str, Any]:
    """One run of `writers` processes; repeated while other processes took more than 10% of a CPU."""
    batch = comparator.make_config(url).record.batch_size
    for attempt in range(1, s.attempts + 1):
        results, go = ctx.Queue(), ctx.Event()
        args = [(url, size, 100 + attempt * 10 + w, maxlen, batch, s.duration_s, results, go) for w in range(writers)]
        procs = [ctx.Process(target=writer_main, args=a, name=f"writer-{a[2]}") for a in args]
        for proc in procs:
            proc.start()
        try:
            comparator._collect(results, procs, "ready", CHILD_TIMEOUT)
            idle = wait_for_idle(s.idle_wait_s)
            net_in0 = info_int(client, "stats", "total_net_input_bytes")
            net_out0 = info_int(client, "stats", "total_net_output_bytes")
            redis0, busy0, own0 = proc_cpu_s(redis_pid), comparator.system_busy_s(), time.process_time()
            go.set()
            done = comparator._collect(results, procs, "done", CHILD_TIMEOUT + s.duration_s)
            redis_cpu = proc_cpu_s(redis_pid) - redis0
            busy, own = comparator.system_busy_s() - busy0, time.process_time() - own0
            net_in = info_int(client, "stats", "total_net_input_bytes") - net_in0
            net_out = info_int(client, "stats", "total_net_output_bytes") - net_out0
            memory: dict[str, Any] = client.info("memory")  # type: ignore[assignment]
        finally:
            go.set()
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
        parts = list(done.values())
        wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
        records = sum(p["records"] for p in parts)
        nbytes = sum(p["bytes"] for p in parts)
        writer_cpu = sum(p["cpu_s"] for p in parts)
        other = max(0.0, busy - redis_cpu - writer_cpu - own) / wall
        run = {
            "size": size.key,
            "writers": writers,
            "attempt": attempt,
            "wall_s": wall,
            "records": records,
            "bytes": nbytes,
            "records_per_s": records / wall,
            "bytes_per_s": nbytes / wall,
            "redis_cpu_s": redis_cpu,
            "redis_cpu_share": redis_cpu / wall,
            "redis_cpu_us_per_record": redis_cpu / records * 1e6,
            "writer_cpu_us_per_record": writer_cpu / records * 1e6,
            "net_in_bytes_per_record": net_in / records,
            "net_out_bytes_per_record": net_out / records,
            "other_cpu_share": other,
            "idle_before": idle,
            # To tell whether the drift of CPU per record follows the allocator's fragmentation.
            "mem_fragmentation_ratio": float(memory.get("mem_fragmentation_ratio", 0.0)),
            "used_memory": int(memory["used_memory"]),
            "xlen_after": sum(int(client.xlen(k)) for k in stream_keys(record_keys(comparator.make_config(url)))),
            "disturbed": other > OTHER_CPU_MAX_SHARE,
        }
        print(
            f"  write {size.key:<5} {writers} writer{'s' if writers > 1 else ' '} {run['records_per_s']:>9,.0f} rec/s "
            f"{run['bytes_per_s'] / 1e6:7.1f} MB/s  redis CPU {run['redis_cpu_share'] * 100:3.0f}% of a core, "
            f"{run['redis_cpu_us_per_record']:6.1f} us/rec  writer {run['writer_cpu_us_per_record']:6.1f} us/rec  "
            f"other {other * 100:3.0f}%{'  DISTURBED' if run['disturbed'] else ''}",
            flush=True,
        )
        if not run["disturbed"] or time.monotonic() > DEADLINE[0]:
            break
    return run


def memory_run(client: redis.Redis, url: str, size: Size, maxlen: int) -> dict[str, Any]:
    """Fill the empty stream to exactly maxlen records: used_memory per retained record."""
    config = comparator.make_config(url)
    workload, chars = workload_for(size, config)
    built = comparator.build_records(workload, POOL, config)
    entries = [as_bytes(f) for f in built.fields]
    client.flushall()
    keys = record_keys(config)
    before = {k: info_int(client, "memory", k) for k in ("used_memory", "used_memory_rss")}
    started = time.perf_counter()
    uvloop.run(fill(url, keys, maxlen, entries, maxlen, config.record.batch_size))
    fill_s = time.perf_counter() - started
    after = {k: info_int(client, "memory", k) for k in ("used_memory", "used_memory_rss")}
    length = sum(int(client.xlen(k)) for k in stream_keys(keys))
    usage = sum(int(client.memory_usage(k, samples=0) or 0) for k in stream_keys(keys))
    record_bytes = built.bytes / len(built.fields)
    out = {
        "size": size.key,
        "answer_chars": chars,
        "record_bytes": record_bytes,
        "xlen": length,
        "used_memory_per_record": (after["used_memory"] - before["used_memory"]) / length,
        "rss_per_record": (after["used_memory_rss"] - before["used_memory_rss"]) / length,
        "memory_usage_per_record": usage / length,
        "fill_s": fill_s,
    }
    print(
        f"  memory {size.key:<5} {record_bytes:7,.0f} B/record as written; {length:,} records retained: "
        f"used_memory {out['used_memory_per_record']:8,.0f} B/record "
        f"(MEMORY USAGE {out['memory_usage_per_record']:,.0f}, RSS {out['rss_per_record']:,.0f})",
        flush=True,
    )
    return out


def to_fields_us(size: Size, config: Config, n: int = 300) -> float:
    """CPU of Exchange.to_fields (redaction + JSON meta) per record, in this process."""
    workload, _ = workload_for(size, config)
    rng = random.Random(5)
    cap = int(config.record.max_body_bytes)
    redactor = Redactor(config.record)
    exchanges = [workload.build(rng, i, time.time(), 1000.0 + i, cap)[0] for i in range(n)]
    started = time.process_time()
    for exchange in exchanges:
        exchange.to_fields(redactor, cap)
    return (time.process_time() - started) / n * 1e6


# ---------------------------------------------------------------------------------------------
# (b) Comparator workers: bench/comparator.py's measured_run on records of each size
# ---------------------------------------------------------------------------------------------


def compare_runs(ctx: Any, url: str, client: redis.Redis, size: Size, s: Settings) -> dict[int, dict[str, Any]]:
    config = comparator.make_config(url)
    workload, _ = workload_for(size, config)
    records = comparator.build_records(workload, s.compare_n[size.key], config)
    out: dict[int, dict[str, Any]] = {}
    repeats = [0]
    for workers in s.compare_workers:
        runs = [
            comparator.measured_run(ctx, url, client, config, records, workers, size.key, repeats)
            for _ in range(s.compare_repeats)
        ]
        best = sorted(runs, key=lambda r: r["pairs_per_s"])[len(runs) // 2]  # the median run
        out[workers] = {
            "pairs_per_s": best["pairs_per_s"],
            "pairs_per_s_per_worker": best["pairs_per_s_per_worker"],
            "worker_cpu_us_per_pair": best["worker_cpu_s"] / best["n"] * 1e6,
            "redis_cpu_us_per_pair": best["redis_cpu_s"] / best["n"] * 1e6,
            "other_cpu_share": best["other_cpu_share"],
            "disturbed": best["disturbed"],
            "check_ok": all(r["check"]["ok"] for r in runs),
            "all_pairs_per_s": [r["pairs_per_s"] for r in runs],
        }
    return out


# ---------------------------------------------------------------------------------------------
# The model: pure arithmetic on the measured per-unit figures (docs/scaling.md)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """Measured per-unit figures for one record size."""

    record_bytes: float  # the entry as written (field names + values)
    redis_append_cpu_us: float  # redis-server CPU per record appended (batched Lua append, MAXLEN ~ trim)
    redis_compare_cpu_us: float  # redis-server CPU per pair compared (XREADGROUP, aggregate Lua, XACK)
    memory_bytes: float  # used_memory per retained record
    net_in_bytes: float  # bytes redis-server receives per record appended
    pairs_per_worker_s: float  # one comparator worker
    proxy_cpu_us: float  # one proxy process, per request


@dataclass(frozen=True)
class Assumptions:
    records_per_request: float = 1.0  # every request is recorded (records.md: one record per client request)
    pairs_per_record: float = 1.0  # shadow.sample_rate 1.0, one candidate (A/A copies ride in the same record)
    redis_cpu_headroom: float = 0.5  # plan redis-server's main thread at half a core (fork, failover, bursts)
    node_memory_bytes: float = 25e9  # maxmemory per node: a 32 GB host keeping room for fork copy-on-write
    node_network_bytes_s: float = 0.5 * 10e9 / 8  # half of a 10 Gbit/s NIC
    replicas: int = 1  # each master streams its writes to this many replicas
    consumer_groups: int = 1  # each record is read once per group (the comparators)
    retention_s: float = 3600.0  # the "keep 1 hour of records" policy (instead of record.maxlen)
    maxlen: int = 100_000  # record.maxlen (default), per stream
    streams: int = 1  # records streams (record.shards); each holds up to maxlen
    process_headroom: float = 0.7  # proxy processes and comparator workers planned at 70% of a core


def _ceil(x: float) -> int:
    return max(1, math.ceil(x - 1e-9))


def plan(rate: float, unit: Unit, a: Assumptions = Assumptions()) -> dict[str, Any]:
    """What `rate` requests/s need, from the per-unit figures.

    ``need_*`` is each resource as a multiple of one node's planned capacity; ``nodes_maxlen`` is the masters
    needed when record.maxlen bounds memory, ``nodes_1h`` when ``retention_s`` of records are kept. More than
    one node needs records on more than one slot (record.shards >= nodes); ``breaks_first_*`` names the
    resource that exhausts one node first under each policy.
    """
    records = rate * a.records_per_request
    pairs = records * a.pairs_per_record
    redis_cpu_cores = (records * unit.redis_append_cpu_us + pairs * unit.redis_compare_cpu_us) / 1e6
    net_per_s = records * unit.net_in_bytes * (1 + a.replicas) + records * unit.record_bytes * a.consumer_groups
    memory_maxlen = a.maxlen * a.streams * unit.memory_bytes
    memory_retention = records * a.retention_s * unit.memory_bytes
    need_cpu = redis_cpu_cores / a.redis_cpu_headroom
    need_net = net_per_s / a.node_network_bytes_s
    maxlen_policy = {"cpu": need_cpu, "network": need_net, "memory": memory_maxlen / a.node_memory_bytes}
    hour_policy = {"cpu": need_cpu, "network": need_net, "memory": memory_retention / a.node_memory_bytes}
    return {
        "rate": rate,
        "records_per_s": records,
        "pairs_per_s": pairs,
        "bytes_per_s": records * unit.record_bytes,
        "redis_cpu_cores": redis_cpu_cores,
        "network_bytes_s": net_per_s,
        "memory_maxlen_bytes": memory_maxlen,
        "maxlen_covers_s": a.maxlen * a.streams / records if records else math.inf,
        "memory_retention_bytes": memory_retention,
        "need_maxlen": maxlen_policy,
        "need_1h": hour_policy,
        "nodes_maxlen": max(_ceil(v) for v in maxlen_policy.values()),
        "nodes_1h": max(_ceil(v) for v in hour_policy.values()),
        "breaks_first_maxlen": max(maxlen_policy, key=lambda k: maxlen_policy[k]),
        "breaks_first_1h": max(hour_policy, key=lambda k: hour_policy[k]),
        "proxy_processes": _ceil(rate * unit.proxy_cpu_us / (1e6 * a.process_headroom)),
        "comparator_workers": _ceil(pairs / (unit.pairs_per_worker_s * a.process_headroom)),
    }


def one_node_ceiling(unit: Unit, a: Assumptions = Assumptions()) -> dict[str, float]:
    """Requests/s one node carries at the planned headroom, per resource (the layout on main: one stream).

    ``memory_1h``: the rate at which retention_s of records fill a node (no limit when record.maxlen bounds it).
    """
    per_request_cpu = (unit.redis_append_cpu_us + a.pairs_per_record * unit.redis_compare_cpu_us) / 1e6
    per_request_net = unit.net_in_bytes * (1 + a.replicas) + unit.record_bytes * a.consumer_groups
    return {
        "cpu": a.redis_cpu_headroom / (per_request_cpu * a.records_per_request),
        "network": a.node_network_bytes_s / (per_request_net * a.records_per_request),
        "memory_1h": a.node_memory_bytes / (unit.memory_bytes * a.retention_s * a.records_per_request),
    }


# ---------------------------------------------------------------------------------------------
# Orchestration and output
# ---------------------------------------------------------------------------------------------


@dataclass
class Measured:
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: dict[str, dict[int, list[dict[str, Any]]]] = field(default_factory=dict)
    compare: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    to_fields_us: dict[str, float] = field(default_factory=dict)


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def units(m: Measured) -> dict[str, Unit]:
    out = {}
    small_tf, small_writer = m.to_fields_us["small"], median_of(m.writes["small"][1], "writer_cpu_us_per_record")
    for key in m.memory:
        by = m.writes[key]
        w1 = by[1]
        writer_us = median_of(w1, "writer_cpu_us_per_record")
        # redis-server's CPU per record drifts up over its life (docs/scaling.md), and the 2-writer runs come
        # after the 1-writer ones: the larger of the two medians, to plan on the conservative side.
        redis_us = max(median_of(runs, "redis_cpu_us_per_record") for runs in by.values())
        # The cited CPU per request had small records: add what the recorder spends more on a bigger one.
        proxy_us = PROXY_CPU_US + max(0.0, m.to_fields_us[key] - small_tf) + max(0.0, writer_us - small_writer)
        out[key] = Unit(
            record_bytes=m.memory[key]["record_bytes"],
            redis_append_cpu_us=redis_us,
            redis_compare_cpu_us=m.compare[key][1]["redis_cpu_us_per_pair"],
            memory_bytes=m.memory[key]["used_memory_per_record"],
            net_in_bytes=median_of(w1, "net_in_bytes_per_record"),
            pairs_per_worker_s=m.compare[key][1]["pairs_per_s_per_worker"],
            proxy_cpu_us=proxy_us,
        )
    return out


def _si(value: float, unit: str = "B") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def render(m: Measured, us: dict[str, Unit], s: Settings) -> str:
    out = [
        "",
        "(a) one Redis node: the recorder's batched Lua append (median of runs; 'redis CPU' = share of one core)",
    ]
    out.append("| record | B/record | writers | records/s | MB/s | redis CPU | redis µs/record | writer µs/record "
               "| B in/record | used_memory B/record | other CPU |")  # fmt: skip
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, by in m.writes.items():
        mem = m.memory[key]
        for writers, runs in by.items():
            disturbed = " (disturbed)" if any(r["disturbed"] for r in runs) else ""
            out.append(
                f"| {key} | {mem['record_bytes']:,.0f} | {writers} | {median_of(runs, 'records_per_s'):,.0f} | "
                f"{median_of(runs, 'bytes_per_s') / 1e6:,.1f} | {median_of(runs, 'redis_cpu_share') * 100:.0f}% | "
                f"{median_of(runs, 'redis_cpu_us_per_record'):.1f} | "
                f"{median_of(runs, 'writer_cpu_us_per_record'):.1f} | "
                f"{median_of(runs, 'net_in_bytes_per_record'):,.0f} | {mem['used_memory_per_record']:,.0f} | "
                f"{max(r['other_cpu_share'] for r in runs) * 100:.0f}%{disturbed} |"
            )
    out += ["", "(b) comparator workers (bench/comparator.py measured_run; every run checked: N pairs counted)"]
    out.append("| record | workers | pairs/s | per worker | worker µs/pair | redis µs/pair | other CPU | check |")
    out.append("|---|---|---|---|---|---|---|---|")
    for key, by in m.compare.items():
        for workers, c in by.items():
            out.append(
                f"| {key} | {workers} | {c['pairs_per_s']:,.0f} | {c['pairs_per_s_per_worker']:,.0f} | "
                f"{c['worker_cpu_us_per_pair']:.0f} | {c['redis_cpu_us_per_pair']:.1f} | "
                f"{c['other_cpu_share'] * 100:.0f}%{' (disturbed)' if c['disturbed'] else ''} | "
                f"{'ok' if c['check_ok'] else 'MISMATCH'} |"
            )
    out += ["", f"(c) proxy process: {PROXY_REQ_S:,.0f} req/s, {PROXY_CPU_US:.0f} µs CPU/request ({PROXY_SOURCE});"]
    out.append(
        "    Exchange.to_fields per record: "
        + ", ".join(f"{k} {v:.0f} µs" for k, v in m.to_fields_us.items())
        + "; per-request CPU used in the model: "
        + ", ".join(f"{k} {u.proxy_cpu_us:.0f} µs" for k, u in us.items())
    )
    return "\n".join([*out, render_model(us, Assumptions())])


def render_model(us: dict[str, Unit], a: Assumptions) -> str:
    """The model's two tables (docs/scaling.md), from the per-unit figures and the assumptions."""
    out = ["", "One node (the layout on main: one stream, one slot): requests/s at the planned headroom"]
    out.append("| record | CPU | network | memory, 1 h kept | breaks first (maxlen) | breaks first (1 h kept) |")
    out.append("|---|---|---|---|---|---|")
    for key, unit in us.items():
        c = one_node_ceiling(unit, a)
        first = min(("cpu", "network"), key=lambda k: c[k])
        first_1h = min(c, key=lambda k: c[k])
        out.append(f"| {key} | {c['cpu']:,.0f} | {c['network']:,.0f} | {c['memory_1h']:,.0f} | {first} | {first_1h} |")
    out += ["", f"Plan ({a}); nodes = masters needed, so record.shards >= nodes"]
    out.append("| req/s | record | MB/s in | redis cores | net (all nodes) | maxlen: memory, covers | nodes (maxlen) "
               "| 1 h: memory | nodes (1 h) | proxy procs | comparator workers |")  # fmt: skip
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in (1_000, 10_000, 100_000):
        for key in ("4k", "32k"):
            if key not in us:
                continue
            p = plan(rate, us[key], a)
            out.append(
                f"| {rate:,} | {key} | {p['bytes_per_s'] / 1e6:,.1f} | {p['redis_cpu_cores']:.2f} | "
                f"{_si(p['network_bytes_s'], 'B/s')} | "
                f"{_si(p['memory_maxlen_bytes'])}, {p['maxlen_covers_s']:,.0f} s | "
                f"{p['nodes_maxlen']} ({p['breaks_first_maxlen']}) | {_si(p['memory_retention_bytes'])} | "
                f"{p['nodes_1h']} ({p['breaks_first_1h']}) | {p['proxy_processes']} | {p['comparator_workers']} |"
            )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one run per row, smaller streams (under 2 minutes)")
    parser.add_argument("--aof", action="store_true", help="redis-server with appendonly yes, appendfsync everysec")
    parser.add_argument("--sizes", default=",".join(s.key for s in SIZES), help="record sizes to measure")
    parser.add_argument("--shards", type=int, default=1, help="record.shards (not implemented here yet)")
    parser.add_argument("--replan", metavar="JSON", help="no measuring: the model from a saved result's figures")
    parser.add_argument("--pairs-per-record", type=float, help="with --replan: mirror sample rate x candidates")
    parser.add_argument("--retention", type=float, metavar="S", help="with --replan: seconds of records kept")
    args = parser.parse_args()
    if args.replan:
        saved = json.loads(Path(args.replan).read_text())
        overrides = {"pairs_per_record": args.pairs_per_record, "retention_s": args.retention}
        a = Assumptions(**{k: v for k, v in overrides.items() if v is not None})
        print(f"figures of {args.replan} ({saved['time']}, commit {saved['machine']['commit']})")
        m = Measured(
            memory=saved["memory"],
            writes={k: {int(w): runs for w, runs in by.items()} for k, by in saved["writes"].items()},
            compare={k: {int(w): c for w, c in by.items()} for k, by in saved["compare"].items()},
            to_fields_us=saved["to_fields_us"],
        )
        print(render_model(units(m), a))  # units() again: the rule of this version, on the saved runs
        return 0
    s = QUICK if args.quick else FULL
    sizes = [size for size in SIZES if size.key in args.sizes.split(",")]
    if "small" not in [size.key for size in sizes]:
        sizes.insert(0, SIZES[0])  # the proxy's cited CPU per request is for small records: the baseline
    logs.configure("warning", "console")
    # bench/comparator.py's patience (10 minutes for live_path.py, 3 attempts) would not fit this script's budget.
    comparator.QUIET_MAX_SECONDS = 60.0
    comparator.IDLE_WAIT_MAX_S = s.idle_wait_s
    comparator.MAX_ATTEMPTS = s.attempts
    comparator.MAX_REPEATS_TOTAL = 4
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ctx = multiprocessing.get_context("spawn")
    began = time.monotonic()
    DEADLINE[0] = began + BUDGET_S[args.quick]
    host = machine()
    m = Measured()
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        server = EmbeddedRedis(Path(tmp), persist=args.aof)
        url = server.start()
        client = redis.Redis.from_url(url, socket_timeout=120)
        try:
            record_keys(comparator.make_config(url), args.shards)
            redis_pid = info_int(client, "server", "process_id")
            version = str(client.info("server")["redis_version"])
            malloc = str(client.info("memory").get("mem_allocator", "?"))
            print(f"redis-server {version} ({malloc}) pid {redis_pid}, aof={'on' if args.aof else 'off'}", flush=True)
            config = comparator.make_config(url)
            for size in sizes:
                m.to_fields_us[size.key] = to_fields_us(size, config)
                maxlen = s.maxlen[size.key]
                m.memory[size.key] = memory_run(client, url, size, maxlen)
                m.writes[size.key] = {}
                for writers in s.writers:
                    m.writes[size.key][writers] = [
                        write_run(ctx, url, client, redis_pid, size, writers, maxlen, s) for _ in range(s.repeats)
                    ]
                m.compare[size.key] = compare_runs(ctx, url, client, size, s)
        finally:
            client.close()
            server.stop()
    us = units(m)
    table = render(m, us, s)
    print(table)
    disturbed = any(r["disturbed"] for by in m.writes.values() for rs in by.values() for r in rs) or any(
        c["disturbed"] for by in m.compare.values() for c in by.values()
    )
    document = {
        "benchmark": "capacity",
        "time": stamp,
        "quick": args.quick,
        "aof": args.aof,
        "shards": args.shards,
        "settings": asdict(s),
        "machine": {**host, "redis_version": version, "mem_allocator": malloc, "loadavg_at_end": os.getloadavg()},
        "proxy": {"req_s": PROXY_REQ_S, "cpu_us_per_request": PROXY_CPU_US, "source": PROXY_SOURCE},
        "memory": m.memory,
        "writes": m.writes,
        "compare": m.compare,
        "to_fields_us": m.to_fields_us,
        "units": {k: asdict(u) for k, u in us.items()},
        "assumptions": asdict(Assumptions()),
        "one_node_ceiling": {k: one_node_ceiling(u) for k, u in us.items()},
        "plan": {f"{rate}:{k}": plan(rate, u) for rate in (1_000, 10_000, 100_000) for k, u in us.items()},
        "disturbed": disturbed,
        "elapsed_s": time.monotonic() - began,
        "table": table,
    }
    path = RESULTS_DIR / f"capacity-{stamp}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nresults: {path.relative_to(ROOT)} (elapsed {time.monotonic() - began:.0f} s; commit {host['commit']})")
    if disturbed:
        print("WARNING: at least one kept run was disturbed by other processes (other CPU > 10% of a core)")
    ok = all(c["check_ok"] for by in m.compare.values() for c in by.values())
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

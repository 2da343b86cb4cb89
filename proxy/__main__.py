"""The ``shadow-proxy`` command line: parse, load config once, configure logging, run on uvloop."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop

from . import __version__, logs
from .canary.tokens import with_feedback_secret
from .config import (
    Config,
    ConfigError,
    load_config,
    masked,
    parse_duration,
    require_admin_token,
    require_incumbent,
    split_listen,
)
from .redis import StoreUnavailable
from .server import serve_until_signal, worker_main
from .tools.embedded_redis import EmbeddedRedis, EmbeddedRedisError, default_data_dir, free_port
from .wiring import check_budgets, feedback_enabled

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadow-proxy",
        description="Shadow-deployment and canary proxy for inference endpoints.",
    )
    parser.add_argument("--version", action="version", version=f"shadow-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy and its admin listener",
        description="Run the proxy. Starts an embedded Redis when no Redis URL is configured.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file (see config.example.toml)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="main listener (proxy.listen)")
    serve.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener (admin.listen)")
    serve.add_argument("--incumbent", metavar="URL", help="the model that answers clients (incumbent.url)")
    serve.add_argument(
        "--candidate", metavar="URL", help="the model that receives mirrors (candidate.url; with one candidate)"
    )
    serve.add_argument("--redis-url", metavar="URL", help="Redis for records (record.redis_url); empty: embedded")
    serve.add_argument("--workers", metavar="N", type=int, help="processes sharing the port (proxy.workers)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="proxy.log_level")

    compare = commands.add_parser(
        "compare",
        help="run a comparator worker",
        description="Run a comparator worker in the consumer group over the records stream.",
    )
    compare.add_argument("--config", metavar="FILE", help="TOML config file")
    compare.add_argument("--redis-url", metavar="URL", help="Redis holding the records (record.redis_url)")
    compare.add_argument("--burst", action="store_true", help="process what is in the stream, then exit")
    compare.add_argument("--consumer", metavar="NAME", help="consumer name in the group (compare.consumer)")

    report = commands.add_parser(
        "report",
        help="print the current summary and verdict",
        description="Print latency, errors, cost, divergence against noise, verdicts and drift.",
    )
    report.add_argument("--config", metavar="FILE", help="TOML config file")
    report.add_argument("--redis-url", metavar="URL", help="Redis holding the aggregates (record.redis_url)")
    report.add_argument("--json", action="store_true", help="print the complete report as JSON")
    report.add_argument("--since", metavar="DURATION", help="range to report, e.g. 15m, 2h, 7d (compare.report_since)")
    report.add_argument("--route", help="only segments of this route (a shadow.routes glob)")
    report.add_argument("--model", help="only segments of this request model")
    report.add_argument(
        "--candidate",
        dest="report_candidate",
        metavar="NAME",
        help="the candidate to report (default: the canary's, else the first)",
    )

    canary = commands.add_parser(
        "canary",
        help="read or drive the canary",
        description="Show the canary state, or act on it (every action is an event with actor and reason).",
    )
    canary.add_argument("action", choices=["status", "promote", "rollback", "pause", "resume", "set-weight"])
    canary.add_argument("weight", nargs="?", type=float, help="with set-weight: the candidate's share, 0..1")
    canary.add_argument("--config", metavar="FILE", help="TOML config file")
    canary.add_argument("--redis-url", metavar="URL", help="Redis holding the canary state (record.redis_url)")
    canary.add_argument("--reason", default="manual", help="why (kept in the event history)")
    canary.add_argument("--actor", default=None, help="who (default: $USER@host)")
    canary.add_argument("--json", action="store_true", help="print JSON")

    demo = commands.add_parser(
        "demo",
        help="run everything locally and show the report",
        description="Embedded Redis, two sample model servers, the proxy, a comparator and traffic; "
        "then the report and the dashboard URL.",
    )
    demo.add_argument("--requests", type=int, default=600, help="requests to send (default 600)")
    demo.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    demo.add_argument(
        "--exit", action="store_true", help="exit after the report instead of keeping the dashboard up until Ctrl-C"
    )

    replay = commands.add_parser(
        "replay",
        help="re-send recorded requests to a candidate and record the pairs",
        description="Re-send recorded requests (the last N, or a time range) to a candidate at a chosen rate. "
        "Each new record pairs the original incumbent answer with the candidate's answer now.",
    )
    replay.add_argument("--config", metavar="FILE", help="TOML config file")
    replay.add_argument("--redis-url", metavar="URL", help="Redis holding the records (record.redis_url)")
    replay.add_argument("--candidate", metavar="URL", help="where to send them (candidate.url)")
    replay.add_argument(
        "--to", metavar="NAME", help="the configured candidate to send them to (default: the canary's, else the first)"
    )
    which = replay.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, metavar="N", help="the last N records (default 100)")
    which.add_argument("--since", metavar="DURATION", help="records of the last DURATION, e.g. 15m")
    replay.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    replay.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default 16)")
    replay.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add or replace a header (recorded secrets are redacted, so pass credentials here)",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a config file and print it resolved",
        description="Validate a config file (with SHADOW_PROXY_* overrides) and print it resolved, secrets masked.",
    )
    check.add_argument("file", metavar="FILE")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    flags = {
        ("proxy", "listen"): getattr(args, "listen", None),
        ("admin", "listen"): getattr(args, "admin_listen", None),
        ("incumbent", "url"): getattr(args, "incumbent", None),
        ("candidate", "url"): getattr(args, "candidate", None),
        ("record", "redis_url"): getattr(args, "redis_url", None),
        ("proxy", "workers"): getattr(args, "workers", None),
        ("proxy", "log_level"): getattr(args, "log_level", None),
        ("compare", "consumer"): getattr(args, "consumer", None),
    }
    overrides: dict[str, dict[str, Any]] = {}
    for (section, key), value in flags.items():
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return overrides


def _with(config: Config, section: str, **values: Any) -> Config:
    updated = getattr(config, section).model_copy(update=values)
    return config.model_copy(update={section: updated})


def _pin_free_ports(config: Config) -> Config:
    """With several workers every process must bind the same port: choose port 0's port once."""
    for section in ("proxy", "admin"):
        host, port = split_listen(getattr(config, section).listen)
        if port == 0:
            config = _with(config, section, listen=f"{host}:{free_port(host)}")
    return config


def _run_workers(config: Config) -> int:
    # Workers write their metrics to files here; /metrics in any worker adds them all up.
    metrics_dir = tempfile.mkdtemp(prefix="shadow-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _spawn_workers(config)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _spawn_workers(config: Config) -> int:
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=worker_main, args=(config,), name=f"worker-{i}") for i in range(config.proxy.workers)
    ]
    for process in processes:
        process.start()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    failed = [p for p in processes if p.exitcode not in (0, -signal.SIGTERM)]
    return EXIT_RUNTIME if failed and not stopping else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=_overrides(args))
    require_incumbent(config)
    require_admin_token(config)
    check_budgets(config)
    logs.configure(config.proxy.log_level, config.proxy.log_format)
    if feedback_enabled(config):
        config = with_feedback_secret(config)  # drawn once here, so every worker shares it
    embedded: EmbeddedRedis | None = None
    if config.record.enabled and not config.record.redis_url:
        data_dir = Path(config.record.embedded_dir) if config.record.embedded_dir else default_data_dir()
        embedded = EmbeddedRedis(data_dir)
        config = _with(config, "record", redis_url=embedded.start())
    try:
        # Process isolation runs even one worker as a spawned process: its metrics and its shadow process's
        # must be written to the multiprocess directory from their first import of prometheus_client.
        if config.proxy.workers > 1 or config.shadow.isolation == "process":
            return _run_workers(_pin_free_ports(config))
        uvloop.run(serve_until_signal(config))
        return EXIT_OK
    finally:
        if embedded is not None:
            embedded.stop()


def _redis_for_reading(config: Config) -> str:
    """The configured Redis, else the embedded one a running `serve` advertises."""
    if config.record.redis_url:
        return config.record.redis_url
    data_dir = Path(config.record.embedded_dir) if config.record.embedded_dir else default_data_dir()
    url_file = data_dir / "redis.url"
    if url_file.exists():
        return url_file.read_text().strip()
    raise ConfigError(
        f"missing config key record.redis_url and no embedded Redis is running ({url_file} not found): "
        "pass --redis-url URL, set SHADOW_PROXY_RECORD_REDIS_URL (or REDIS_URL), or start `shadow-proxy serve` first"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from .comparator.worker import Worker

    config = load_config(args.config, overrides=_overrides(args))
    logs.configure(config.proxy.log_level, config.proxy.log_format)
    worker = Worker(config, _redis_for_reading(config))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        try:
            await worker.run(burst=args.burst)
        finally:
            await worker.close()

    uvloop.run(run())
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .comparator.render import render
    from .comparator.report_loader import load_report

    config = load_config(args.config, overrides=_overrides(args))
    since = parse_duration(args.since or config.compare.report_since)
    filters = {k: v for k, v in (("route", args.route), ("model", args.model)) if v}
    report = uvloop.run(
        load_report(
            config,
            _redis_for_reading(config),
            since_seconds=since,
            segment_filter=filters,
            candidate=args.report_candidate,
        )
    )
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        render(report, Console())
    return EXIT_OK


def cmd_canary(args: argparse.Namespace) -> int:
    from .canary.controller import Controller

    config = load_config(args.config, overrides=_overrides(args))
    if args.action == "set-weight" and args.weight is None:
        raise ConfigError("set-weight needs a weight: shadow-proxy canary set-weight 0.05")
    actor = args.actor or f"{os.environ.get('USER', 'operator')}@{socket.gethostname()}"

    async def run() -> dict[str, Any]:
        controller = Controller(config, _redis_for_reading(config))
        try:
            if args.action != "status":
                await controller.act(args.action, actor=actor, reason=args.reason, weight=args.weight)
            state = await controller.current()
            _, pairs, evidence = await controller.evidence(state, time.time())
            history = await controller.store.events(10)
            return {"state": state.as_dict(), "evidence": evidence, "history": history}
        finally:
            await controller.close()

    result = uvloop.run(run())
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        return EXIT_OK
    state = result["state"]
    print(f"canary {state['status']}: stage {state['stage']}, candidate weight {state['weight']:g} ({state['reason']})")
    for name, gate in result["evidence"]["gates"].items():
        print(f"  {name:<14} {gate['outcome']:<13} {gate['rule']}")
    for event in result["history"][:5]:
        print(f"  event {event['action']} by {event['actor']}: {event['reason']}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .tools.demo import run_demo

    logs.configure("warning", "console")
    if args.requests < 1 or args.rate <= 0:
        raise ConfigError("--requests must be at least 1 and --rate above 0")
    try:
        uvloop.run(run_demo(requests=args.requests, rate=args.rate, keep_running=not args.exit, console=Console()))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .tools.replay import Replayer, load_entries

    config = load_config(args.config, overrides=_overrides(args))
    if not config.candidate:
        raise ConfigError("missing config key candidate.url: pass --candidate URL or set [candidate] url")
    names = [c.name for c in config.candidate]
    if args.to and args.to not in names:
        raise ConfigError(f"--to {args.to!r}: no candidate has this name (configured: {', '.join(names)})")
    headers = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"bad --header {item!r}: expected 'NAME: VALUE'")
        headers.append((name.strip(), value.strip()))
    if args.rate <= 0 or args.concurrency < 1:
        raise ConfigError("--rate must be above 0 and --concurrency at least 1")
    logs.configure(config.proxy.log_level, config.proxy.log_format)
    redis_url = _redis_for_reading(config)
    since = time.time() - parse_duration(args.since) if args.since else None
    console = Console(stderr=True)
    replayer = Replayer(config, redis_url, headers=headers, name=args.to)

    async def run() -> None:
        entries = await load_entries(config, redis_url, last=args.last, since=since)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
            bar = progress.add_task("replay", total=len(entries))
            await replayer.run(
                entries, rate=args.rate, concurrency=args.concurrency, on_done=lambda: progress.advance(bar)
            )

    interrupted = False
    try:
        uvloop.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
    p = replayer.progress
    state = "stopped" if interrupted else "done"
    print(
        f"replay {state} (session {replayer.session}): {p.sent} of {p.total} sent, {p.recorded} recorded, "
        f"{p.failed} failed, skipped {p.skipped or 0}; last entry {p.last_entry or '-'}"
    )
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    require_admin_token(config)
    sys.stdout.buffer.write(orjson.dumps(masked(config), option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "serve": cmd_serve,
        "compare": cmd_compare,
        "report": cmd_report,
        "canary": cmd_canary,
        "demo": cmd_demo,
        "replay": cmd_replay,
        "check-config": cmd_check_config,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"shadow-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"shadow-proxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (EmbeddedRedisError, OSError, StoreUnavailable) as exc:
        print(f"shadow-proxy: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

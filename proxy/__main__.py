"""The ``shadow-proxy`` command line: parse, load config once, configure logging, run on uvloop."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop

from . import __version__, logs
from .config import Config, ConfigError, load_config, masked, require_incumbent, split_listen
from .embedded_redis import EmbeddedRedis, EmbeddedRedisError, default_data_dir, free_port
from .server import serve_until_signal, worker_main

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
    serve.add_argument("--candidate", metavar="URL", help="the model that receives mirrors (candidate.url)")
    serve.add_argument("--redis-url", metavar="URL", help="Redis for records (record.redis_url); empty: embedded")
    serve.add_argument("--workers", metavar="N", type=int, help="processes sharing the port (proxy.workers)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="proxy.log_level")

    check = commands.add_parser(
        "check-config",
        help="validate a config file and print it resolved",
        description="Validate a config file (with SHADOW_PROXY_* overrides) and print it resolved, secrets masked.",
    )
    check.add_argument("file", metavar="FILE")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    flags = {
        ("proxy", "listen"): args.listen,
        ("admin", "listen"): args.admin_listen,
        ("incumbent", "url"): args.incumbent,
        ("candidate", "url"): args.candidate,
        ("record", "redis_url"): args.redis_url,
        ("proxy", "workers"): args.workers,
        ("proxy", "log_level"): args.log_level,
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
    logs.configure(config.proxy.log_level, config.proxy.log_format)
    embedded: EmbeddedRedis | None = None
    if config.record.enabled and not config.record.redis_url:
        data_dir = Path(config.record.embedded_dir) if config.record.embedded_dir else default_data_dir()
        embedded = EmbeddedRedis(data_dir)
        config = _with(config, "record", redis_url=embedded.start())
    try:
        if config.proxy.workers > 1:
            return _run_workers(_pin_free_ports(config))
        uvloop.run(serve_until_signal(config))
        return EXIT_OK
    finally:
        if embedded is not None:
            embedded.stop()


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    sys.stdout.buffer.write(orjson.dumps(masked(config), option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "check-config": cmd_check_config}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"shadow-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (EmbeddedRedisError, OSError) as exc:
        print(f"shadow-proxy: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

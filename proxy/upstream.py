"""One upstream model server: its connection pool (``http1.Pool``), timeouts and error mapping.

Failures are data: every client exception becomes an error class (a metric label and a record
field) and an HTTP status for the live path, in ``classify`` and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from yarl import URL

from . import http1
from .config import UpstreamConfig
from .exchange import ArmCapture, now
from .http1 import Response, UpstreamError
from .metrics import Metrics
from .shaping import Shaping

# What a send can raise: the client's own failures, and the system's (a socket error outside a request).
SEND_ERRORS = (UpstreamError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Failure:
    """An upstream failure as the proxy reports it: error class, status for the client, detail."""

    error: str
    status: int
    detail: str


def classify(exc: BaseException) -> Failure:
    """Map a client exception to an error class; timeouts answer 504, every other failure 502."""
    detail = str(exc) or type(exc).__name__
    match exc:
        case UpstreamError():
            return Failure(exc.error, 504 if exc.timeout else 502, detail)
        case TimeoutError():
            return Failure("timeout", 504, detail or "total timeout exceeded")
        case ConnectionRefusedError():
            return Failure("connect_error", 502, detail)
        case OSError():
            return Failure("client_error", 502, detail)
    raise exc


class Upstream:
    """One upstream model server with its own connection pool and timeouts."""

    def __init__(self, name: str, config: UpstreamConfig, metrics: Metrics | None = None) -> None:
        self.name = name
        self.config = config
        self.shaping = Shaping.from_config(config)
        base = URL(config.url)
        self.origin = str(base.origin())
        self.host = base.host or ""
        self.port = base.port or 80
        self._prefix = base.raw_path.rstrip("/")
        self._pool = http1.Pool(
            self.host,
            self.port,
            tls=base.scheme == "https",
            limit=config.pool_size,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            total_timeout=config.total_timeout,
            on_wait=metrics.child(metrics.upstream_pool_waits, name).inc if metrics is not None else None,
        )

    async def start(self) -> None:
        """Nothing to open: connections are made on demand (kept for the callers' start/close pairing)."""

    async def close(self) -> None:
        await self._pool.close()

    def url(self, raw_path_qs: str) -> URL:
        """The upstream URL for a request target, path and query kept byte for byte."""
        return URL(self.origin + self._prefix + raw_path_qs, encoded=True)

    def begin(
        self, method: str, raw_path_qs: str, headers: list[tuple[str, str]], body: bytes
    ) -> Coroutine[Any, Any, Response]:
        """``send``, written at once when a connection is idle: await the result for the answer's head."""
        return self._pool.begin(method, self._prefix + raw_path_qs, headers, body)

    async def send(self, method: str, raw_path_qs: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        """Send a request and return the response once its headers arrived; the caller reads and releases it.
        Redirects are the client's business: a 3xx is relayed like any other answer."""
        return await self._pool.send(method, self._prefix + raw_path_qs, headers, body)

    async def capture(
        self, arm: ArmCapture, method: str, raw_path_qs: str, headers: list[tuple[str, str]], body: bytes
    ) -> Failure | None:
        """Send a request whose answer nobody waits for, read it to the end into ``arm``; the failure, if any."""
        try:
            response = await self.send(method, raw_path_qs, headers, body)
            try:
                arm.on_headers(response.status, response.headers, now())
                while chunk := await response.readany():
                    arm.on_chunk(chunk, now())
            finally:
                response.release()
        except SEND_ERRORS as exc:
            failure = classify(exc)
            arm.finish(now(), failure.error)
            return failure
        arm.finish(now())
        return None

    async def probe(self, within: float) -> tuple[bool, str]:
        """Readiness: GET the health path when configured, else open a TCP connection."""
        try:
            async with asyncio.timeout(within):
                if self.config.health_path:
                    resp = await self.send("GET", self.config.health_path, [], b"")
                    try:
                        while await resp.readany():
                            pass
                    finally:
                        resp.release()
                    return resp.status < 500, f"HTTP {resp.status}"
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                return True, "connected"
        except SEND_ERRORS as exc:
            return False, classify(exc).error

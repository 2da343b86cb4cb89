"""The only caller of aiohttp's client: one session and pool per upstream, timeouts, error mapping.

Failures are data: every client exception becomes an error class (a metric label and a record
field) and an HTTP status for the live path, in ``classify`` and nowhere else.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from yarl import URL

from .config import UpstreamConfig
from .exchange import ArmCapture, now
from .shaping import Shaping

# aiohttp adds these when absent; a transparent proxy sends only what the client sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Content-Type")


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
        case aiohttp.ConnectionTimeoutError():
            return Failure("connect_timeout", 504, detail)
        case aiohttp.SocketTimeoutError():
            return Failure("read_timeout", 504, detail)
        case asyncio.TimeoutError():
            return Failure("timeout", 504, detail or "total timeout exceeded")
        case aiohttp.ClientConnectorError() | ConnectionRefusedError():
            return Failure("connect_error", 502, detail)
        case aiohttp.ServerDisconnectedError():
            return Failure("disconnected", 502, detail)
        case aiohttp.ClientPayloadError():
            return Failure("payload_error", 502, detail)
        case aiohttp.ClientResponseError():
            return Failure("bad_response", 502, detail)
        case aiohttp.ClientError() | OSError():
            return Failure("client_error", 502, detail)
    raise exc


class Upstream:
    """One upstream model server with its own connection pool and timeouts."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.shaping = Shaping.from_config(config)
        base = URL(config.url)
        self.origin = str(base.origin())
        self.host = base.host or ""
        self.port = base.port or 80
        self._prefix = base.raw_path.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=config.total_timeout or None,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.pool_size, limit_per_host=0, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def url(self, raw_path_qs: str) -> URL:
        """The upstream URL for a request target, path and query kept byte for byte."""
        return URL(self.origin + self._prefix + raw_path_qs, encoded=True)

    async def send(
        self, method: str, raw_path_qs: str, headers: list[tuple[str, str]], body: bytes
    ) -> aiohttp.ClientResponse:
        """Send a request and return the response once its headers arrived; the caller reads and releases it."""
        assert self._session is not None, "Upstream.start() was not awaited"
        return await self._session.request(
            method,
            self.url(raw_path_qs),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        )

    async def capture(
        self, arm: ArmCapture, method: str, raw_path_qs: str, headers: list[tuple[str, str]], body: bytes
    ) -> Failure | None:
        """Send a request whose answer nobody waits for, read it to the end into ``arm``; the failure, if any."""
        try:
            response = await self.send(method, raw_path_qs, headers, body)
            try:
                arm.on_headers(response.status, list(response.headers.items()), now())
                async for chunk in response.content.iter_any():
                    arm.on_chunk(chunk, now())
            finally:
                response.release()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = classify(exc)
            arm.finish(now(), failure.error)
            return failure
        arm.finish(now())
        return None

    async def probe(self, within: float) -> tuple[bool, str]:
        """Readiness: GET the health path when configured, else open a TCP connection."""
        try:
            async with asyncio.timeout(within):
                if self.config.health_path and self._session is not None:
                    async with self._session.get(self.url(self.config.health_path), allow_redirects=False) as resp:
                        return resp.status < 500, f"HTTP {resp.status}"
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                return True, "connected"
        except (OSError, aiohttp.ClientError, TimeoutError) as exc:
            return False, classify(exc).error

"""An OpenAI-compatible API the comparator calls (embeddings for semantic scores, chat for the judge).

One connection pool per endpoint, created on first use inside the running loop and closed when the
worker stops; its key travels only in the Authorization header; every failure becomes a reason (a
metric label), so callers count it and fall back instead of failing a batch.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr


class EndpointError(Exception):
    """The call failed: ``reason`` is timeout, unavailable, http_4xx or http_5xx."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Endpoint:
    """POSTs JSON to one base URL with a bounded pool and a whole-call timeout."""

    def __init__(self, url: str, api_key: SecretStr, *, max_in_flight: int, timeout: float) -> None:
        self._url = url
        self._key = api_key
        self._limit = max_in_flight
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def post(self, path: str, body: dict[str, Any]) -> bytes:
        """The answer's bytes; EndpointError when it did not come, or not with status 200."""
        try:
            async with self._client().post(f"{self._url}{path}", data=orjson.dumps(body)) as resp:
                if resp.status != 200:
                    raise EndpointError(f"http_{resp.status // 100}xx")
                return await resp.read()
        except aiohttp.ClientError:
            raise EndpointError("unavailable") from None
        except TimeoutError:  # the session's own timeout (a caller's deadline arrives as a cancellation)
            raise EndpointError("timeout") from None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Content-Type": "application/json"}
            if key := self._key.get_secret_value():
                headers["Authorization"] = f"Bearer {key}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                connector=aiohttp.TCPConnector(limit=self._limit),
            )
        return self._session

    async def close(self) -> None:
        """Close the pool (the worker calls it when it stops)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

"""Semantic similarity of answer pairs through an OpenAI-compatible embeddings endpoint the user runs.

For one batch of records, ``SemanticScorer.scores`` embeds the text answers of every compared pair
(candidate vs incumbent, and the A/A pairs), each distinct text once, and returns the cosine of each pair
for ``aggregate.contributions`` to count beside the lexical score (``docs/divergence.md``).

Invariants: a batch never waits longer than ``compare.semantic.timeout`` for the endpoint, and never fails
because of it: when the endpoint is slow, down or answers garbage, the batch's pairs fall back to the
lexical score alone, each with the reason (``timeout``, ``unavailable``, ``http_4xx``, ``http_5xx``,
``bad_answer``). Requests are bounded (``max_in_flight`` at once, ``rate_per_second``); embeddings are
cached by a hash of the text (LRU). The API key is only ever put in the Authorization header.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from ..config import SemanticConfig
from .aggregate import PairKey, Semantic, compared_pairs
from .endpoint import Endpoint, EndpointError
from .parse import Arm, Record

Vector = npt.NDArray[np.float64]


class SemanticFailure(Exception):
    """The endpoint did not give usable embeddings; ``reason`` is the snake_case fallback reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def text_of(arm: Arm) -> str | None:
    """The answer text to embed: a non-blank text answer without tool calls (those are scored lexically)."""
    output = arm.output
    if output.kind == "embedding" or output.tool_calls or output.text is None or not output.text.strip():
        return None
    return output.text


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class SemanticScorer:
    """Embeds answers in batches, bounded in rate and concurrency, with an LRU cache by content hash."""

    def __init__(self, cfg: SemanticConfig) -> None:
        self._cfg = cfg
        self._cache: OrderedDict[bytes, Vector] = OrderedDict()
        self._endpoint = Endpoint(cfg.url, cfg.api_key, max_in_flight=cfg.max_in_flight, timeout=cfg.timeout)
        self._in_flight = asyncio.Semaphore(cfg.max_in_flight)
        self._next_slot = 0.0

    async def scores(self, records: Sequence[Record]) -> Semantic:
        """Each text pair's cosine, clipped to [0, 1]; on failure every pair that needed the endpoint falls back."""
        pairs: list[tuple[PairKey, str, str]] = []
        for record in records:
            for key, a, b in compared_pairs(record):
                x, y = text_of(a), text_of(b)
                if x is not None and y is not None:
                    pairs.append((key, x, y))
        scored = {key: 1.0 for key, x, y in pairs if x == y}  # the same text: no call needed
        pending = [(key, x, y) for key, x, y in pairs if x != y]
        if not pending:
            return Semantic(scored)
        try:
            async with asyncio.timeout(self._cfg.timeout):
                vectors = await self._embed({t for _, x, y in pending for t in (x, y)})
        except TimeoutError:
            return Semantic(scored, {key: "timeout" for key, _, _ in pending})
        except SemanticFailure as exc:
            return Semantic(scored, {key: exc.reason for key, _, _ in pending})
        for key, x, y in pending:
            scored[key] = min(1.0, max(0.0, float(np.dot(vectors[x], vectors[y]))))
        return Semantic(scored)

    async def _embed(self, texts: set[str]) -> dict[str, Vector]:
        """Unit vectors of the texts: from the cache, else from the endpoint in chunks of batch_size."""
        found: dict[str, Vector] = {}
        missing: list[str] = []
        for text in sorted(texts):
            cached = self._cache.get(digest(text))
            if cached is None:
                missing.append(text)
            else:
                self._cache.move_to_end(digest(text))
                found[text] = cached
        size = self._cfg.batch_size
        chunks = [missing[i : i + size] for i in range(0, len(missing), size)]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._request(chunk)) for chunk in chunks]
        except* SemanticFailure as failures:
            raise failures.exceptions[0] from None
        for chunk, task in zip(chunks, tasks, strict=True):
            for text, vector in zip(chunk, task.result(), strict=True):
                found[text] = vector
                self._remember(text, vector)
        return found

    def _remember(self, text: str, vector: Vector) -> None:
        if self._cfg.cache_entries == 0:
            return
        self._cache[digest(text)] = vector
        while len(self._cache) > self._cfg.cache_entries:
            self._cache.popitem(last=False)

    async def _request(self, chunk: list[str]) -> list[Vector]:
        body: dict[str, Any] = {"input": chunk, "encoding_format": "float"}
        if self._cfg.model:
            body["model"] = self._cfg.model
        async with self._in_flight:
            await self._pace()
            try:
                raw = await self._endpoint.post("/embeddings", body)
            except EndpointError as exc:
                raise SemanticFailure(exc.reason) from None
        return vectors(raw, len(chunk))

    async def _pace(self) -> None:
        """At most rate_per_second requests start per second: each takes the next free slot."""
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self._cfg.rate_per_second
        if slot > now:
            await asyncio.sleep(slot - now)

    async def close(self) -> None:
        """Close the endpoint's connection pool (the worker calls it when it stops)."""
        await self._endpoint.close()


def vectors(raw: bytes, expected: int) -> list[Vector]:
    """Unit vectors from an OpenAI embeddings answer, in input order; SemanticFailure("bad_answer") when it
    is not one (wrong count, ragged or empty vectors, non-numbers, zero vectors)."""
    try:
        items = sorted(orjson.loads(raw)["data"], key=lambda item: int(item["index"]))
        found = [np.asarray(item["embedding"], dtype=np.float64) for item in items]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise SemanticFailure("bad_answer") from None
    if len(found) != expected or any(v.ndim != 1 or not v.size or v.shape != found[0].shape for v in found):
        raise SemanticFailure("bad_answer")
    out = []
    for vector in found:
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm) or norm == 0.0:
            raise SemanticFailure("bad_answer")
        out.append(vector / norm)
    return out

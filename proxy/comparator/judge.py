"""A pairwise judge: an OpenAI-compatible chat model the user runs says which of two answers is better.

For one batch of records, ``Judge.verdicts`` takes the compared pairs (candidate vs incumbent, and the
incumbent vs its A/A copy) of the records sampled by a keyed hash of the proxy's record id (reproducible, not
steerable by a client), shows the judge the request's prompt and both answers blind, in an order chosen per
pair by another hash, asks for ``{"winner": "A" | "B" | "tie"}`` and maps the answer back to a candidate
win, loss or tie (for the A/A pair: the answer shown first or second), for ``aggregate.contributions`` to
count (``docs/divergence.md``, "Pairwise judge").

Invariants: a batch never waits longer than ``compare.judge.timeout`` for the judge, and never fails because
of it: a pair not judged is counted with its reason (``budget``, ``timeout``, ``unavailable``,
``http_4xx``, ``http_5xx``, ``bad_answer``). At most ``max_in_flight`` calls at once; the judge's spend over
the last hour stays under ``budget_per_hour`` (each call reserves its estimated price before it starts).
The API key is only ever put in the Authorization header.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import JudgeConfig
from .aggregate import NOISE_PAIR, Judged, PairKey, compared_pairs
from .endpoint import Endpoint, EndpointError
from .parse import Arm, Record
from .pricing import PriceBook, Usage, estimated_tokens

ANSWER_CAP = 8000  # characters of each answer (and of the prompt) shown to the judge
EXPECTED_OUTPUT_TOKENS = 16

SYSTEM = (
    "You are an impartial judge comparing two answers, A and B, to the same request. Judge which answer "
    "serves the request better: correct, helpful, complete and clear. Ignore the order in which the answers "
    "are shown and their length as such. If neither is better, say tie. Reply with a JSON object and "
    'nothing else: {"winner": "A"} or {"winner": "B"} or {"winner": "tie"}.'
)


class JudgeFailure(Exception):
    """The judge gave no usable verdict; ``reason`` is the snake_case reason the pair is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _unit(*parts: str) -> float:
    """A uniform number in [0, 1) from a hash of the parts: the same for the same record, every run."""
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sampled(request_id: str, rate: float) -> bool:
    """Whether a record's pairs are judged: a hash of the proxy's record id below the sample rate."""
    return rate > 0.0 and _unit("judge-sample", request_id) < rate


def swapped(key: PairKey) -> bool:
    """Whether the pair's second answer (the candidate, or the A/A copy) is shown first, as A."""
    return _unit("judge-order", *key) < 0.5


def answer_text(arm: Arm) -> str | None:
    """What the judge reads of an answer: its text, else its tool calls or document as JSON."""
    output = arm.output
    if output.text is not None and output.text.strip():
        return output.text[:ANSWER_CAP]
    if output.tool_calls:
        return orjson.dumps(output.tool_calls, default=str).decode()[:ANSWER_CAP]
    if output.document is not None and output.kind != "embedding":
        return orjson.dumps(output.document, default=str).decode()[:ANSWER_CAP]
    return None


def messages(prompt: str, a: str, b: str) -> list[dict[str, str]]:
    """The chat the judge sees: the request and the two answers, labelled A and B only."""
    user = (
        f"Request:\n<<<\n{prompt[:ANSWER_CAP]}\n>>>\n\nAnswer A:\n<<<\n{a}\n>>>\n\nAnswer B:\n<<<\n{b}\n>>>\n\n"
        'Which answer is better? Reply with JSON only: {"winner": "A" | "B" | "tie"}.'
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_WINNER = re.compile(r'"?winner"?\s*[:=]\s*"?\s*(A|B|tie)\b', re.IGNORECASE)
_BARE = re.compile(r"^\W*(A|B|tie)\W*$", re.IGNORECASE)


def winner(content: str) -> str:
    """ "A", "B" or "tie" from the judge's reply: the JSON asked for, else a lenient reading of it (a
    fenced block, a bare letter, ``winner: B``); JudgeFailure("bad_answer") when it says none of them."""
    text = content.strip()
    try:
        found = orjson.loads(text.removeprefix("```json").removeprefix("```").removesuffix("```").strip())
        if isinstance(found, dict) and isinstance(found.get("winner"), str):
            text = found["winner"]
    except orjson.JSONDecodeError:
        pass
    match = _BARE.match(text) or _WINNER.search(text)
    if match is None:
        raise JudgeFailure("bad_answer")
    picked = match.group(1)
    return "tie" if picked.lower() == "tie" else picked.upper()


def outcome(key: PairKey, position: str) -> str:
    """The picked position mapped back to the pair: the candidate's win/loss/tie, or A/A first/second/tie."""
    if key[1] == NOISE_PAIR:
        return {"A": "first", "B": "second"}.get(position, "tie")
    if position == "tie":
        return "tie"
    second_won = (position == "A") == swapped(key)
    return "win" if second_won else "loss"


@dataclass(frozen=True, slots=True)
class _Call:
    key: PairKey
    prompt: str
    first: str  # shown as A
    second: str  # shown as B


class Judge:
    """Judges sampled pairs through a chat endpoint, bounded in concurrency, time and spend."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self._cfg = cfg
        price = cfg.price
        table = (price.input_per_1k, price.output_per_1k) if price.input_per_1k or price.output_per_1k else None
        self._book = PriceBook(table)
        self._spent: deque[tuple[float, float]] = deque()  # (time, amount): the judge's charges this hour
        self._in_flight = asyncio.Semaphore(cfg.max_in_flight)
        self._endpoint = Endpoint(cfg.url, cfg.api_key, max_in_flight=cfg.max_in_flight, timeout=cfg.timeout)

    def calls(self, records: Sequence[Record]) -> list[_Call]:
        """The sampled pairs of a batch, each with its answers in the order the judge will see them."""
        found = []
        for record in records:
            if not sampled(record.request_id, self._cfg.sample_rate):
                continue
            for key, incumbent, other in compared_pairs(record):
                x, y = answer_text(incumbent), answer_text(other)
                if x is None or y is None:
                    continue
                first, second = (y, x) if swapped(key) else (x, y)
                found.append(_Call(key, record.prompt_text, first, second))
        return found

    async def verdicts(self, records: Sequence[Record]) -> Judged:
        """The judge's verdict on every sampled pair of the batch, or why it has none."""
        calls = self.calls(records)
        if not calls:
            return Judged()
        results: dict[PairKey, tuple[str, float] | str] = {}
        try:
            async with asyncio.timeout(self._cfg.timeout), asyncio.TaskGroup() as group:
                for call in calls:
                    group.create_task(self._judge(call, results))
        except TimeoutError:
            pass
        judged = {k: v for k, v in results.items() if isinstance(v, tuple)}
        skipped = {c.key: str(results.get(c.key, "timeout")) for c in calls if c.key not in judged}
        return Judged(
            outcomes={k: outcome(k, position) for k, (position, _) in judged.items()},
            positions={k: position for k, (position, _) in judged.items()},
            skipped=skipped,
            cost={k: charged for k, (_, charged) in judged.items()},
        )

    async def _judge(self, call: _Call, results: dict[PairKey, tuple[str, float] | str]) -> None:
        async with self._in_flight:
            reserved = self._reserve(call)
            if reserved is None:
                results[call.key] = "budget"
                return
            try:
                position, charged = await self._request(call)
            except JudgeFailure as exc:
                results[call.key] = exc.reason
                self._settle(reserved, 0.0)
                return
            except asyncio.CancelledError:
                self._settle(reserved, 0.0)  # cut by the batch's deadline: charge what we cannot know as nothing
                raise
            self._settle(reserved, charged)
            results[call.key] = (position, charged)

    def _reserve(self, call: _Call) -> tuple[float, float] | None:
        """Book the call's estimated price before it starts; None when it would not fit the hour's budget."""
        if not self._cfg.budget_per_hour:
            return (time.monotonic(), 0.0)
        now = time.monotonic()
        while self._spent and self._spent[0][0] < now - 3600.0:
            self._spent.popleft()
        text = "".join(m["content"] for m in messages(call.prompt, call.first, call.second))
        estimate = self._price(Usage(estimated_tokens(text), EXPECTED_OUTPUT_TOKENS))
        if sum(amount for _, amount in self._spent) + estimate > self._cfg.budget_per_hour:
            return None
        entry = (now, estimate)
        self._spent.append(entry)
        return entry

    def _settle(self, reserved: tuple[float, float], charged: float) -> None:
        """Replace a reservation by what the call actually cost."""
        if not self._cfg.budget_per_hour:
            return
        try:
            self._spent.remove(reserved)
        except ValueError:
            pass  # already older than an hour
        if charged:
            self._spent.append((reserved[0], charged))

    def _price(self, usage: Usage) -> float:
        # An unknown price counts as nothing: set compare.judge.price to make the budget bind.
        return self._book.price(self._cfg.model or None, usage).amount or 0.0

    async def _request(self, call: _Call) -> tuple[str, float]:
        body: dict[str, Any] = {
            "messages": messages(call.prompt, call.first, call.second),
            "temperature": 0,
            "max_tokens": 20,
            "response_format": {"type": "json_object"},
        }
        if self._cfg.model:
            body["model"] = self._cfg.model
        try:
            raw = await self._endpoint.post("/chat/completions", body)
        except EndpointError as exc:
            raise JudgeFailure(exc.reason) from None
        content, usage = _reply(raw)
        text = "".join(m["content"] for m in body["messages"])
        usage = usage or Usage(estimated_tokens(text), estimated_tokens(content))
        return winner(content), self._price(usage)

    async def close(self) -> None:
        """Close the endpoint's connection pool (the worker calls it when it stops)."""
        await self._endpoint.close()


def _reply(raw: bytes) -> tuple[str, Usage | None]:
    """The message content and reported usage of an OpenAI chat completion; JudgeFailure when it is none."""
    try:
        answer = orjson.loads(raw)
        content = answer["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise JudgeFailure("bad_answer") from None
    if not isinstance(content, str):
        raise JudgeFailure("bad_answer")
    usage = answer.get("usage") if isinstance(answer, dict) else None
    try:
        found = Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])) if usage else None
    except (KeyError, TypeError, ValueError):
        found = None
    return content, found

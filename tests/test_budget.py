"""Spend budgets: the sliding-hour ledger, usage found in a capture, and a budget shared by processes."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.budget import BUCKET_SECONDS, MirrorCost, SpendLedger, usage_in
from proxy.config import CandidateConfig
from proxy.exchange import ArmCapture, Exchange

from .conftest import eventually, make_config
from .models import long_stream, openai_chat

T0 = 1_800_000_000.0  # a Unix time on a minute boundary


def test_the_ledger_sums_the_last_hour_and_forgets_older_spend() -> None:
    """Spend counts for sixty minutes, then falls out of the window."""
    ledger = SpendLedger(budget_per_hour=1.0)
    ledger.add(0.6, T0)
    ledger.add(0.5, T0 + 30 * BUCKET_SECONDS)
    assert ledger.spent(T0 + 30 * BUCKET_SECONDS) == pytest.approx(1.1) and ledger.exhausted(T0 + 1800)
    assert ledger.spent(T0 + 60 * BUCKET_SECONDS) == pytest.approx(0.5)
    assert not ledger.exhausted(T0 + 60 * BUCKET_SECONDS)


def test_shared_totals_include_this_process_without_counting_it_twice() -> None:
    """After a sync the deployment's total replaces the local figure; unsynced spend is added on top."""
    ledger = SpendLedger(budget_per_hour=10.0)
    ledger.add(1.0, T0)
    minute = SpendLedger.minute(T0)
    assert ledger.take_unsynced() == {minute: 1.0}
    ledger.set_shared({minute: 3.0}, T0)  # 1.0 of ours plus 2.0 from other processes
    assert ledger.spent(T0) == pytest.approx(3.0)
    ledger.add(0.5, T0)
    assert ledger.spent(T0) == pytest.approx(3.5)
    pending = ledger.take_unsynced()
    ledger.restore_unsynced(pending)  # a failed write keeps them for the next sync
    assert ledger.take_unsynced() == {minute: 0.5}


def test_a_spent_budget_does_not_swallow_the_breakers_probe() -> None:
    """With the breaker waiting to probe, a budget skip must not use up the probe and leave it stuck open."""
    from proxy.breaker import Breaker

    dispatcher = _dispatcher(budget=0.01)
    assert dispatcher.ledger is not None
    dispatcher._breaker = Breaker(threshold=1, cooldown=0.0, opened_at=0.0)  # open, cooldown over
    dispatcher.ledger.add(1.0, time.time())
    assert dispatcher.skip_reason(_exchange()) == "budget"
    assert dispatcher._breaker.probing is False
    dispatcher.ledger = SpendLedger(0.01)
    assert dispatcher.skip_reason(_exchange()) is None and dispatcher._breaker.probing is True


def _dispatcher(budget: float) -> Any:
    from proxy.metrics import Metrics
    from proxy.wiring import _candidate_mirror

    config = make_config(candidate={"url": "http://127.0.0.1:1", "budget_per_hour": budget})
    return _candidate_mirror(config, config.candidate[0], Metrics(), 0)


def _exchange() -> Exchange:
    return Exchange("r", "POST", "/v1/x", "", "/*", [], "127.0.0.1", 0.0, 0.0, body=b"{}")


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            _sse({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}})
            + b"data: [DONE]\n\n",
            {"prompt": 9, "completion": 30},
        ),
        (
            orjson.dumps(
                {
                    "usage": {
                        "prompt_tokens": 100,
                        "completion_tokens": 50,
                        "prompt_tokens_details": {"cached_tokens": 60},
                        "completion_tokens_details": {"reasoning_tokens": 20},
                    }
                }
            ),
            {"prompt": 100, "completion": 50, "cached": 60, "reasoning": 20},
        ),
        (
            _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}}),
            {"completion": 15},
        ),
        (
            orjson.dumps({"usage": {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 5}}),
            {"prompt": 100, "completion": 5, "cached": 90},
        ),
        (b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n', {}),
    ],
    ids=["openai-include-usage", "openai-details", "anthropic-delta", "anthropic-cache", "none"],
)
def test_usage_is_found_in_the_bytes_of_an_answer(data: bytes, expected: dict[str, int]) -> None:
    """The last usage object of a body, in OpenAI's convention whatever the API."""
    assert usage_in(data) == expected


def test_a_stream_cut_by_the_capture_cap_is_billed_from_the_usage_at_its_end() -> None:
    """The head of a long stream is kept, its usage is in the tail: the cost is exact, not an estimate."""
    cost = MirrorCost(CandidateConfig(url="http://c:1", price={"input_per_1k": 1.0, "output_per_1k": 2.0}))
    arm = ArmCapture("c", "shadow", cap=1024, tail=bytearray())
    arm.on_headers(200, [("Content-Type", "text/event-stream")], 0.0)
    piece = _sse({"choices": [{"index": 0, "delta": {"content": "word " * 50}}]})
    for _ in range(200):
        arm.on_chunk(piece, 0.0)
    arm.on_chunk(_sse({"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 10_000}}), 0.0)
    assert arm.truncated
    assert cost(arm, b'{"model": "x"}') == pytest.approx((1000 * 1.0 + 10_000 * 2.0) / 1000)


def test_without_usage_a_cut_answer_is_counted_in_proportion_to_what_arrived() -> None:
    """No usage block: tokens of the kept text, scaled by the bytes received over the bytes kept."""
    cost = MirrorCost(CandidateConfig(url="http://c:1", price={"input_per_1k": 0.0, "output_per_1k": 1.0}))
    whole = ArmCapture("c", "shadow", cap=10**6)
    cut = ArmCapture("c", "shadow", cap=4096)
    for arm in (whole, cut):
        arm.on_headers(200, [("Content-Type", "text/event-stream")], 0.0)
        for _ in range(100):
            arm.on_chunk(_sse({"choices": [{"index": 0, "delta": {"content": "lorem ipsum dolor "}}]}), 0.0)
    exact, estimated = cost(whole, b"{}"), cost(cut, b"{}")
    assert exact is not None and estimated is not None
    assert estimated == pytest.approx(exact, rel=0.1)


def test_a_budget_on_a_model_without_a_price_is_refused() -> None:
    """A fixed model name nobody prices cannot be held to a budget: serve exits 2 naming the key."""
    from proxy.config import ConfigError
    from proxy.wiring import check_budgets

    config = make_config(candidate={"url": "http://c:1", "model": "my-own-llama-8b", "budget_per_hour": 1.0})
    with pytest.raises(ConfigError, match="candidate.0.budget_per_hour = 1.0: no price is known"):
        check_budgets(config)
    priced = make_config(
        candidate={
            "url": "http://c:1",
            "model": "my-own-llama-8b",
            "budget_per_hour": 1.0,
            "price": {"output_per_1k": 1},
        }
    )
    check_budgets(priced)


async def test_two_processes_share_one_budget_through_redis(upstreams, proxies, redis_url) -> None:
    """Spend on one proxy counts against the other after a sync: the budget is the deployment's."""
    incumbent, candidate = await upstreams(openai_chat(["ok"])), await upstreams(openai_chat(["ok"]))
    priced = {"url": candidate.url, "price": {"input_per_1k": 1.0, "output_per_1k": 1.0}, "budget_per_hour": 0.035}
    sections: dict[str, Any] = {"incumbent": {"url": incumbent.url}, "candidate": priced}
    a = await proxies(**sections, record={"redis_url": redis_url})
    b = await proxies(**sections, record={"redis_url": redis_url})
    body = {"model": "m", "messages": []}  # 9 + 1 tokens: 0.01 per mirror
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(f"http://127.0.0.1:{a.port}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
    await eventually(lambda: len(candidate.requests) == 3)
    ledger = b.runtime.shadows[0].ledger
    assert ledger is not None
    await eventually(lambda: ledger.spent(time.time()) >= 0.03 - 1e-9)  # b read a's spend from Redis
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(f"http://127.0.0.1:{b.port}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
    metrics = b.runtime.metrics
    await eventually(lambda: metrics.value("shadow_proxy_mirrors_in_flight", target="candidate") == 0)
    assert len(candidate.requests) == 4  # one more fits under 0.035, then b's mirrors stop too
    assert metrics.value("shadow_proxy_mirrors_skipped_total", target="candidate", reason="budget") == 2


async def test_without_recording_a_budget_still_counts_long_answers(upstreams, proxies) -> None:
    """Recording off (nothing captured for records) still bills a long stream from the usage at its end."""
    incumbent, candidate = await upstreams(openai_chat(["ok"])), await upstreams(long_stream(300_000))
    priced = {"url": candidate.url, "price": {"input_per_1k": 0.0, "output_per_1k": 1.0}, "budget_per_hour": 100.0}
    proxy = await proxies(incumbent={"url": incumbent.url}, candidate=priced, record={"enabled": False})
    async with aiohttp.ClientSession() as client:
        body = {"model": "m", "messages": [], "stream": True}
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
    metrics = proxy.runtime.metrics
    await eventually(lambda: metrics.value("shadow_proxy_mirror_spend_total", target="candidate") > 0)
    # about 300 KB of "word " * 20 events: 20 tokens per ~170-byte event, so some 35,000 output tokens
    assert 25.0 < metrics.value("shadow_proxy_mirror_spend_total", target="candidate") < 50.0


async def test_with_redis_down_the_budget_holds_locally_and_syncs_later(redis_url) -> None:
    """A sync against a Redis that refuses keeps this process's spend for the next one; nothing raises."""
    from proxy.budget import SpendSync
    from proxy.redis import Clients, Keys, RecordWriter
    from proxy.tools.embedded_redis import free_port

    ledger = SpendLedger(budget_per_hour=1.0)
    gone = Clients(f"redis://127.0.0.1:{free_port('127.0.0.1')}/0", socket_timeout=0.5)
    down = RecordWriter(gone.get("records"), Keys("shadow"), maxlen=10)
    now = time.time()
    ledger.add(2.0, now)
    await SpendSync(down, {"c": ledger}).sync(now)
    await gone.close()
    assert ledger.exhausted(now)  # still held to the budget on what it knows
    clients = Clients(redis_url, socket_timeout=2.0)
    up = RecordWriter(clients.get("records"), Keys("shadow"), maxlen=10)
    try:
        await SpendSync(up, {"c": ledger}).sync(now)
        assert ledger.take_unsynced() == {}  # the kept spend reached Redis once it answered
        assert ledger.spent(now) == pytest.approx(2.0)
    finally:
        await clients.close()

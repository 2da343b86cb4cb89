"""Planted scenarios whose truth is known, driven through the real proxy, compared by a real worker."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker

from .conftest import eventually, make_config

Behaviour = Callable[[int], Awaitable[tuple[int, str]]]  # request number -> (status, answer text)


def chat_server(behaviour: Behaviour):  # type: ignore[no-untyped-def]
    """An OpenAI-compatible chat endpoint whose answer for request X-Request-Id r<i> is behaviour(i)."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        number = int(request.headers["x-request-id"].removeprefix("r"))
        status, text = await behaviour(number)
        if status >= 500:
            return web.json_response({"error": {"message": "boom"}}, status=status)
        return web.json_response(
            {
                "id": f"chatcmpl-{random.random()}",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split())},
            }
        )

    return handler


def fixed(delay_ms: float, text: str = "the same answer") -> Behaviour:
    async def behave(number: int) -> tuple[int, str]:
        await asyncio.sleep(delay_ms / 1000)
        return 200, text

    return behave


GATES = {"latency_min_effect_ms": 5.0, "latency_p99_increase_pct": 60.0}
PRICES = {"price": {"input_per_1k": 0.5, "output_per_1k": 1.5}}


async def run_scenario(
    upstreams,
    proxies,
    redis_url: str,
    incumbent: Behaviour,
    candidate: Behaviour,
    *,
    n: int,
    compare: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send n chat requests through the proxy, run a worker in burst mode, return the report."""
    inc = await upstreams(chat_server(incumbent))
    cand = await upstreams(chat_server(candidate))
    compare = {"gates": GATES, **(compare or {})}
    sections = {
        "incumbent": {"url": inc.url, **PRICES},
        "candidate": {"url": cand.url, **PRICES},
        "record": {"redis_url": redis_url},
        "compare": compare,
    }
    proxy = await proxies(**sections)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}]})
    semaphore = asyncio.Semaphore(10)
    async with aiohttp.ClientSession() as client:

        async def send(i: int) -> None:
            async with semaphore:
                url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
                async with client.post(url, data=body, headers={"X-Request-Id": f"r{i}"}) as resp:
                    await resp.read()

        await asyncio.gather(*(send(i) for i in range(n)))
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == n)
    config = make_config(**sections)
    worker = Worker(config, redis_url)
    await worker.run(burst=True)
    await worker.close()
    return (await load_report(config, redis_url, since_seconds=3600)).as_json()


def gates(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in report["verdict"]["gates"]}


async def test_identical_arms_pass_every_gate(upstreams, proxies, redis_url) -> None:
    """Same answers, same latency, same cost: every gate passes."""
    # 500 pairs: with zero errors on both arms the exact bound on the difference drops below 1 pp.
    # A/A copies on a fifth of the requests: the divergence gate needs 50 of them.
    report = await run_scenario(
        upstreams, proxies, redis_url, fixed(30), fixed(30), n=500, compare={"noise_sample_rate": 0.2}
    )
    outcomes = {name: g["outcome"] for name, g in gates(report).items()}
    # No user feedback was sent, so the satisfaction gate has nothing to judge.
    assert outcomes == {**{name: "pass" for name in outcomes}, "satisfaction": "skipped"}, gates(report)
    assert report["verdict"]["outcome"] == "pass"
    assert report["summary"]["pairs"] == 500
    assert report["summary"]["divergence"]["candidate_rate"] == 0.0
    assert report["summary"]["cost"]["ratio"] == 1.0


async def test_slower_candidate_fails_latency(upstreams, proxies, redis_url) -> None:
    """A candidate 30% slower fails the p50 latency gate, with an interval around the true delay."""
    report = await run_scenario(upstreams, proxies, redis_url, fixed(40), fixed(52), n=150)
    p50 = gates(report)["latency_p50"]
    assert p50["outcome"] == "fail", p50
    # The planted delay is 12 ms; a busy machine stretches every measured latency (the servers, the proxy
    # and this client share one event loop), so only a lower bound on the measured shift is machine-proof.
    assert p50["estimate"] > 8, (p50["details"], p50["interval"])
    assert p50["interval"][0] > p50["threshold"]
    assert report["verdict"]["outcome"] == "fail"


async def test_candidate_errors_against_clean_incumbent_fail(upstreams, proxies, redis_url) -> None:
    """5% candidate errors against 0% fail the error gate; the examples name failing requests."""

    async def flaky(number: int) -> tuple[int, str]:
        return (500, "") if number % 20 == 0 else (200, "the same answer")

    report = await run_scenario(upstreams, proxies, redis_url, fixed(0), flaky, n=400)
    error = gates(report)["error_rate"]
    assert error["outcome"] == "fail", error
    assert error["details"]["candidate_errors"] == 20 and error["details"]["incumbent_errors"] == 0
    assert report["summary"]["errors"]["candidate"]["by_class"] == {"http_5xx": 20}
    client_ids = {e["request_id"]: e["client_request_id"] for e in report["examples"]}
    assert error["examples"] and all(int(client_ids[rid].removeprefix("r")) % 20 == 0 for rid in error["examples"])


async def test_ten_percent_divergence_is_measured_with_an_interval(upstreams, proxies, redis_url) -> None:
    """Text differing on 10% of requests gives a divergence near 10% whose interval contains it."""

    async def sometimes_different(number: int) -> tuple[int, str]:
        return 200, "a quite different reply" if number % 10 == 0 else "the same answer"

    report = await run_scenario(
        upstreams, proxies, redis_url, fixed(0), sometimes_different, n=600, compare={"noise_sample_rate": 0.25}
    )
    divergence = gates(report)["divergence"]
    assert report["summary"]["divergence"]["candidate_rate"] == 0.1  # the exact-match figure
    assert divergence["interval"][0] < 0.1 < divergence["interval"][1]
    assert divergence["outcome"] == "fail", (divergence["rule"], divergence["interval"], divergence["details"])
    assert report["examples"][0]["candidate"]["output"] == "a quite different reply"


async def test_noise_floor_absorbs_a_nondeterministic_incumbent(upstreams, proxies, redis_url) -> None:
    """When the incumbent disagrees with itself as often as with the candidate, the excess is near 0."""
    rng = random.Random(7)

    async def coin(number: int) -> tuple[int, str]:
        return 200, rng.choice(["heads it is", "tails it is"])

    report = await run_scenario(upstreams, proxies, redis_url, coin, coin, n=400, compare={"noise_sample_rate": 1.0})
    divergence = report["summary"]["divergence"]
    assert divergence["noise_pairs"] == 400
    assert 0.35 < divergence["noise_rate"] < 0.65 and 0.35 < divergence["candidate_rate"] < 0.65
    assert abs(gates(report)["divergence"]["estimate"]) < 0.1


async def test_too_few_pairs_are_inconclusive_never_pass(upstreams, proxies, redis_url) -> None:
    """Below the minimum sample every gate is inconclusive and says how many more pairs it needs."""
    report = await run_scenario(upstreams, proxies, redis_url, fixed(0), fixed(0), n=20)
    for name, gate in gates(report).items():
        if name == "satisfaction":
            assert gate["outcome"] == "skipped"  # no feedback at all
            continue
        assert gate["outcome"] == "inconclusive", gate
        if name == "divergence":
            # It needs min_noise_pairs A/A copies first, at the default 5% noise rate about 1,000 pairs.
            assert gate["need_more_pairs"] >= 80 and "A/A" in gate["rule"], gate["rule"]
        elif name == "latency_p99":
            # A p99 has no upper bound until P(all n below it) = 0.99^n drops under the interval's tail
            # (1.25%): 437 pairs, more than the 100-pair gate minimum.
            assert gate["need_more_pairs"] == math.ceil(math.log(0.0125) / math.log(0.99)) - 20
        else:
            assert gate["need_more_pairs"] == 80
    assert report["verdict"]["outcome"] == "inconclusive"


def sampled(model: Any, *, off_topic_every: int = 0) -> Behaviour:
    """A sampling LLM: each call draws a fresh paraphrase; optionally every k-th request answers another question."""

    async def behave(number: int) -> tuple[int, str]:
        question = number % len(model.questions)
        if off_topic_every and number % off_topic_every == 0:
            question = (question + 1) % len(model.questions)
        return 200, model.answer(question)

    return behave


async def test_sampled_text_with_noise_sampling_passes_divergence(upstreams, proxies, redis_url) -> None:
    """Two samplings of one model differ on almost every prompt, yet divergence passes against the A/A noise."""
    from .test_divergence_gate import SampledModel

    model = SampledModel(np.random.default_rng(11))
    # 2,000 pairs and some 600 A/A pairs: enough for the 5% tail's interval to clear the 5 pp margin.
    report = await run_scenario(
        upstreams, proxies, redis_url, sampled(model), sampled(model), n=2000, compare={"noise_sample_rate": 0.3}
    )
    divergence = gates(report)["divergence"]
    assert report["summary"]["divergence"]["candidate_rate"] > 0.9  # hardly any answer is identical
    assert divergence["outcome"] == "pass", divergence["rule"]


async def test_answering_another_question_on_a_tenth_of_prompts_fails_divergence(upstreams, proxies, redis_url) -> None:
    """The same sampling model, off topic on 10% of prompts: the share below the A/A's low tail gives it away."""
    from .test_divergence_gate import SampledModel

    model = SampledModel(np.random.default_rng(12))
    candidate = sampled(model, off_topic_every=10)
    report = await run_scenario(
        upstreams, proxies, redis_url, sampled(model), candidate, n=1000, compare={"noise_sample_rate": 0.2}
    )
    divergence = gates(report)["divergence"]
    assert divergence["outcome"] == "fail", divergence["rule"]

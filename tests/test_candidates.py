"""Real LLM candidates end to end: shaped requests, own credentials, several candidates, budgets, every API shape."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import redis

from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker
from proxy.config import Config

from .conftest import eventually, make_config, records
from .models import anthropic_messages, long_stream, openai_chat, openai_embeddings, openai_responses

SECRET = "sk-candidate-secret-7c1f0e"


async def compare_all(config: Config, redis_url: str, candidate: str | None = None) -> dict[str, Any]:
    """Run a comparator worker over everything recorded, then build the report."""
    worker = Worker(config, redis_url)
    try:
        progress = await worker.run(burst=True)
    finally:
        await worker.close()
    assert progress.dead_lettered == 0  # every answer shape is read, none set aside
    return (await load_report(config, redis_url, since_seconds=3600, candidate=candidate)).as_json()


async def post_json(port: int, path: str, body: dict[str, Any], n: int = 1, **headers: str) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as client:
        for _ in range(n):
            async with client.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)
    return statuses


def everything_in_redis(client: redis.Redis) -> bytes:
    """Every key and every value of every type, concatenated: what a secret must never be part of."""
    dump = []
    for key in client.scan_iter(count=1000):
        dump.append(key)
        kind = client.type(key)
        if kind == b"string":
            dump.append(client.get(key) or b"")
        elif kind == b"hash":
            dump.extend(b"%s=%s" % item for item in client.hgetall(key).items())
        elif kind == b"list":
            dump.extend(client.lrange(key, 0, -1))
        elif kind == b"zset":
            dump.extend(client.zrange(key, 0, -1))
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                dump.extend(b"%s=%s" % item for item in fields.items())
    return b"\n".join(dump)


async def test_a_vllm_candidate_with_its_own_model_name_gets_every_mirror(upstreams, proxies, redis_url) -> None:
    """Without shaping vLLM refuses the incumbent's model name; with it every mirror succeeds and is compared."""
    incumbent = await upstreams(openai_chat(["paris", "is", "the", "capital"]))
    vllm = await upstreams(openai_chat(["paris", "is", "a", "capital"], served_model="Qwen/Qwen2.5-7B-Instruct"))
    sections = {"incumbent": {"url": incumbent.url}, "record": {"redis_url": redis_url}}
    proxy = await proxies(**sections, candidate={"url": vllm.url, "model": "Qwen/Qwen2.5-7B-Instruct"})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "capital of France?"}]}
    assert await post_json(proxy.port, "/v1/chat/completions", body, n=20) == [200] * 20
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 20)
    assert {json.loads(r["body"])["model"] for r in vllm.requests} == {"Qwen/Qwen2.5-7B-Instruct"}
    assert {json.loads(r["body"])["model"] for r in incumbent.requests} == {"gpt-4o-mini"}
    report = await compare_all(make_config(**sections, candidate={"url": vllm.url}), redis_url)
    summary = report["summary"]
    assert summary["pairs"] == 20 and summary["errors"]["candidate"]["rate"] == 0.0
    assert summary["divergence"]["pairs_compared"] == 20
    assert summary["answers"]["candidate"]["shapes"] == {"openai.chat": 20}


async def test_unshaped_the_same_vllm_candidate_fails_every_mirror(upstreams, proxies, redis_url) -> None:
    """The failure shaping fixes, shown: the mirrored incumbent model name earns a 404 each time."""
    incumbent = await upstreams(openai_chat(["a"]))
    vllm = await upstreams(openai_chat(["a"], served_model="Qwen/Qwen2.5-7B-Instruct"))
    sections = {"incumbent": {"url": incumbent.url}, "record": {"redis_url": redis_url}}
    proxy = await proxies(**sections, candidate={"url": vllm.url})
    await post_json(proxy.port, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, n=5)
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 5)
    report = await compare_all(make_config(**sections, candidate={"url": vllm.url}), redis_url)
    assert report["summary"]["errors"]["candidate"]["by_class"] == {"http_4xx": 5}


async def test_the_candidates_key_reaches_it_and_no_redis_key_or_log_line(upstreams, redis_url, tmp_path) -> None:
    """An injected ${VAR} credential replaces the client's key on the candidate only, and is stored nowhere."""
    incumbent = await upstreams(openai_chat(["ok"]))
    candidate = await upstreams(openai_chat(["ok"]))
    config_file = tmp_path / "shadow.toml"
    config_file.write_text(
        f'[proxy]\nlisten = "127.0.0.1:0"\nlog_level = "debug"\n[admin]\nlisten = "127.0.0.1:0"\n'
        f'[incumbent]\nurl = "{incumbent.url}"\n[record]\nredis_url = "{redis_url}"\n'
        f'[candidate]\nurl = "{candidate.url}"\nmodel = "cand-model"\n'
        '[candidate.set_headers]\nauthorization = "Bearer ${CANDIDATE_API_KEY}"\n'
    )
    env = {"PATH": "/usr/bin:/bin", "CANDIDATE_API_KEY": SECRET}
    process = await asyncio.create_subprocess_exec(
        *_shadow_proxy(),
        "serve",
        "--config",
        str(config_file),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    lines: list[bytes] = []
    port = await _listening_port(process.stdout, lines)
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        statuses = await post_json(port, "/v1/chat/completions", body, n=5, Authorization="Bearer client-key")
        assert statuses == [200] * 5
        client = redis.Redis.from_url(redis_url)
        await eventually(lambda: client.xlen("{shadow}:records") == 5)
    finally:
        process.terminate()
        lines.extend((await process.communicate())[0].splitlines())
    assert {dict(r["headers"])["Authorization"] for r in candidate.requests} == {f"Bearer {SECRET}"}
    assert {dict(r["headers"])["Authorization"] for r in incumbent.requests} == {"Bearer client-key"}
    stored = everything_in_redis(client)
    assert b"cand-model" in stored and SECRET.encode() not in stored
    log = b"\n".join(lines)
    assert b"request_proxied" in log and SECRET.encode() not in log


def _shadow_proxy() -> list[str]:
    import sys

    return [sys.executable, "-m", "proxy"]


async def _listening_port(stream: asyncio.StreamReader, lines: list[bytes]) -> int:
    async with asyncio.timeout(30):
        while True:
            line = await stream.readline()
            assert line, b"\n".join(lines)
            lines.append(line)
            if b"proxy_listening" in line:
                return int(json.loads(line)["listen"].rsplit(":", 1)[1])


async def test_the_openai_sdks_default_base64_embeddings_are_compared(upstreams, proxies, redis_url) -> None:
    """The SDK asks for base64 vectors; the pairs are decoded and compared, none dead-lettered."""
    incumbent = await upstreams(openai_embeddings())
    candidate = await upstreams(openai_embeddings(scale=1.01))
    sections = {"incumbent": {"url": incumbent.url}, "candidate": {"url": candidate.url}}
    proxy = await proxies(**sections, record={"redis_url": redis_url})
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="sk-test", max_retries=0)
    for text in ("one", "three words here", "x"):
        result = await client.embeddings.create(model="text-embedding-3-small", input=text)
        assert len(result.data[0].embedding) == 4
    await client.close()
    assert all(json.loads(r["body"])["encoding_format"] == "base64" for r in incumbent.requests)
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 3)
    report = await compare_all(make_config(**sections, record={"redis_url": redis_url}), redis_url)
    divergence = report["summary"]["divergence"]
    assert divergence["pairs_compared"] == 3 and divergence["embedding_cosine_mean"] > 0.99
    assert redis.Redis.from_url(redis_url).xlen("{shadow}:dead-letter") == 0


async def test_the_anthropic_sdk_works_through_the_proxy_plain_and_streamed(upstreams, proxies, redis_url) -> None:
    """Messages answers reach the SDK untouched and both arms' answers are recognised and compared."""
    incumbent = await upstreams(anthropic_messages("The capital of France is Paris."))
    candidate = await upstreams(anthropic_messages("Paris is the capital of France."))
    sections = {"incumbent": {"url": incumbent.url}, "candidate": {"url": candidate.url, "model": "claude-haiku"}}
    proxy = await proxies(**sections, record={"redis_url": redis_url})
    client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{proxy.port}", api_key="sk-ant", max_retries=0)
    messages: Any = [{"role": "user", "content": "capital of France?"}]
    plain = await client.messages.create(model="claude-sonnet", max_tokens=50, messages=messages)
    assert plain.content[0].text == "The capital of France is Paris."  # type: ignore[union-attr]
    async with client.messages.stream(model="claude-sonnet", max_tokens=50, messages=messages) as stream:
        assert await stream.get_final_text() == "The capital of France is Paris."
    await client.close()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 2)
    report = await compare_all(make_config(**sections, record={"redis_url": redis_url}), redis_url)
    summary = report["summary"]
    assert summary["divergence"]["pairs_compared"] == 2 and summary["errors"]["candidate"]["rate"] == 0.0
    assert summary["answers"]["incumbent"]["shapes"] == {"anthropic.messages": 2}
    assert summary["answers"]["candidate"]["recognised_share"] == 1.0
    assert 0.3 < summary["divergence"]["text_similarity_mean"] < 1.0


async def test_a_responses_api_stream_is_compared(upstreams, proxies, redis_url) -> None:
    """Typed Responses events are reassembled into the answer text on both arms."""
    incumbent = await upstreams(openai_responses("blue sky today"))
    candidate = await upstreams(openai_responses("blue sky today"))
    sections = {"incumbent": {"url": incumbent.url}, "candidate": {"url": candidate.url}}
    proxy = await proxies(**sections, record={"redis_url": redis_url})
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="sk-test", max_retries=0)
    stream = await client.responses.create(model="gpt-4.1", input="colour of the sky?", stream=True)
    deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "blue sky today "
    await client.close()
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 1)
    report = await compare_all(make_config(**sections, record={"redis_url": redis_url}), redis_url)
    summary = report["summary"]
    assert summary["answers"]["candidate"]["shapes"] == {"openai.responses": 1}
    assert summary["divergence"]["pairs_compared"] == 1 and summary["divergence"]["candidate_rate"] == 0.0


async def test_a_stream_longer_than_the_capture_cap_is_truncated_not_an_error(upstreams, proxies, redis_url) -> None:
    """A 3 MB answer under a 256 KiB cap keeps its timings and status, counts as truncated, not as an error."""
    incumbent = await upstreams(long_stream(3 * 1024**2))
    candidate = await upstreams(long_stream(3 * 1024**2))
    sections = {"incumbent": {"url": incumbent.url}, "candidate": {"url": candidate.url}}
    proxy = await proxies(**sections, record={"redis_url": redis_url, "max_body_bytes": "256KiB"})
    async with aiohttp.ClientSession() as client:
        body = {"model": "o3", "stream": True, "messages": []}
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=body) as resp:
            received = await resp.read()
    assert len(received) > 3 * 1024**2 and received.endswith(b"data: [DONE]\n\n")
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 1)
    config = make_config(**sections, record={"redis_url": redis_url})
    summary = (await compare_all(config, redis_url))["summary"]
    assert summary["errors"]["incumbent"]["rate"] == 0.0 and summary["errors"]["candidate"]["rate"] == 0.0
    assert summary["answers"]["truncated"] == 1 and summary["divergence"]["pairs_compared"] == 0
    assert summary["latency_ms"]["total"]["candidate"]["n"] == 1


async def test_two_candidates_get_their_own_verdicts_on_the_same_requests(upstreams, proxies, redis_url) -> None:
    """One slow and one erroring candidate, mirrored the same requests, each judged against the incumbent."""
    incumbent = await upstreams(openai_chat(["same", "answer"]))
    slow = await upstreams(openai_chat(["same", "answer"], delay=0.15))
    failing = await upstreams(openai_chat(["same", "answer"], status=503))
    candidates = [{"name": "slow", "url": slow.url}, {"name": "failing", "url": failing.url}]
    sections: dict[str, Any] = {"incumbent": {"url": incumbent.url}, "candidate": candidates}
    gates = {"min_pairs": 20}
    proxy = await proxies(**sections, record={"redis_url": redis_url}, shadow={"max_in_flight": 64})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}]}
    async with aiohttp.ClientSession() as client:

        async def one(i: int) -> None:
            url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
            async with client.post(url, json=body, headers={"x-request-id": f"req-{i}"}) as resp:
                assert resp.status == 200

        await asyncio.gather(*(one(i) for i in range(40)))
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 40)
    ids = {r["meta"]["request_id"] for r in records(redis.Redis.from_url(redis_url))}
    assert len(ids) == 40 and len(slow.requests) == len(failing.requests) == 40
    config = make_config(**sections, record={"redis_url": redis_url}, compare={"gates": gates})
    slow_report = await compare_all(config, redis_url, candidate="slow")
    failing_report = (await load_report(config, redis_url, since_seconds=3600, candidate="failing")).as_json()
    slow_gates = {g["name"]: g["outcome"] for g in slow_report["verdict"]["gates"]}
    failing_gates = {g["name"]: g["outcome"] for g in failing_report["verdict"]["gates"]}
    assert slow_report["summary"]["pairs"] == failing_report["summary"]["pairs"] == 40
    assert slow_gates["latency_p50"] == "fail" and slow_gates["error_rate"] != "fail"
    assert failing_gates["error_rate"] == "fail"
    assert {c["name"]: c["verdict"] for c in slow_report["candidates"]} == {"failing": "fail", "slow": "fail"}


async def test_a_candidate_over_its_spend_budget_is_skipped_and_counted(upstreams, proxies, redis_url) -> None:
    """Once an hour's budget is spent on a candidate, its mirrors stop with reason "budget"; others go on."""
    incumbent = await upstreams(openai_chat(["ok"]))
    pricey = await upstreams(openai_chat(["ok"]))
    free = await upstreams(openai_chat(["ok"]))
    # 9 prompt + 1 completion tokens at 1.0 per 1k input and output: 0.01 per mirror; the budget buys 3.
    priced = {"name": "pricey", "url": pricey.url, "price": {"input_per_1k": 1.0, "output_per_1k": 1.0}}
    candidates = [{**priced, "budget_per_hour": 0.025}, {"name": "free", "url": free.url}]
    proxy = await proxies(incumbent={"url": incumbent.url}, candidate=candidates, record={"redis_url": redis_url})
    metrics = proxy.runtime.metrics
    body = {"model": "gpt-4o-mini", "messages": []}
    for _ in range(10):
        assert await post_json(proxy.port, "/v1/chat/completions", body) == [200]
        await eventually(lambda: metrics.value("shadow_proxy_mirrors_in_flight", target="pricey") == 0)
    assert len(pricey.requests) == 3 and len(free.requests) == 10
    assert metrics.value("shadow_proxy_mirrors_skipped_total", target="pricey", reason="budget") == 7
    await eventually(lambda: metrics.value("shadow_proxy_records_written_total") == 10)
    skipped = [r["meta"]["shadow_skipped"] for r in records(redis.Redis.from_url(redis_url))]
    assert skipped.count({"pricey": "budget"}) == 7


async def test_the_canary_serves_its_named_candidate_shaped_and_keeps_mirroring_the_others(
    upstreams, proxies, redis_url
) -> None:
    """At full weight the canary's candidate answers users with its own model name, the incumbent is
    mirrored back (reverse shadow) with the client's, and the other candidate is still mirrored."""
    incumbent = await upstreams(openai_chat(["a"], served_model="gpt-4o-mini"))
    vllm = await upstreams(openai_chat(["b"], served_model="llama-8b"))
    mini = await upstreams(openai_chat(["c"], served_model="gpt-4.1-mini"))
    stage = {"weight": 1.0, "min_duration": 3600, "min_pairs": 100_000}
    candidates = [{"name": "mini", "url": mini.url, "model": "gpt-4.1-mini"}, {"name": "vllm", "url": vllm.url}]
    candidates[1]["model"] = "llama-8b"
    proxy = await proxies(
        incumbent={"url": incumbent.url},
        candidate=candidates,
        record={"redis_url": redis_url},
        canary={
            "enabled": True,
            "candidate": "vllm",
            "stage": [stage],
            "weight_poll_interval": 0.1,
            "served_by_header": "x-served-by",
        },
    )
    assert proxy.runtime.canary is not None and proxy.runtime.canary.weights is not None
    await eventually(lambda: proxy.runtime.canary.weights.weight == 1.0)  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as client:
        body = {"model": "gpt-4o-mini", "messages": []}
        async with client.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["x-served-by"] == "vllm"
            assert (await resp.json())["choices"][0]["message"]["content"] == "b"
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 1)
    (record,) = records(redis.Redis.from_url(redis_url))
    arms = record["meta"]["arms"]
    assert record["meta"]["served_by"] == "vllm"
    assert (arms["live"]["upstream"], arms["live"]["model"], arms["live"]["status"]) == ("vllm", "llama-8b", 200)
    assert (arms["shadow.incumbent"]["model"], arms["shadow.incumbent"]["status"]) == (None, 200)
    assert (arms["shadow.mini"]["model"], arms["shadow.mini"]["status"]) == ("gpt-4.1-mini", 200)


@pytest.mark.parametrize(
    ("path", "server", "request_body", "shape"),
    [
        ("/v1/chat/completions", openai_chat(["x", "y"]), {"model": "m", "messages": []}, "openai.chat"),
        (
            "/v1/chat/completions",
            openai_chat(["x", "y"]),
            {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}},
            "openai.chat",
        ),
        ("/v1/embeddings", openai_embeddings(), {"model": "e", "input": "x"}, "openai.embedding"),
        (
            "/v1/embeddings",
            openai_embeddings(),
            {"model": "e", "input": ["x", "yy"], "encoding_format": "base64"},
            "openai.embedding",
        ),
        ("/v1/responses", openai_responses("hi there"), {"model": "m", "input": "x"}, "openai.responses"),
        (
            "/v1/responses",
            openai_responses("hi there"),
            {"model": "m", "input": "x", "stream": True},
            "openai.responses",
        ),
        ("/v1/messages", anthropic_messages("hi there"), {"model": "c", "messages": []}, "anthropic.messages"),
        (
            "/v1/messages",
            anthropic_messages("hi there"),
            {"model": "c", "messages": [], "stream": True},
            "anthropic.messages",
        ),
    ],
    ids=[
        "chat",
        "chat-stream-usage",
        "embeddings-float",
        "embeddings-base64",
        "responses",
        "responses-stream",
        "messages",
        "messages-stream",
    ],
)
async def test_every_common_answer_shape_is_recognised_on_both_arms(
    upstreams, proxies, redis_url, path: str, server: Any, request_body: dict[str, Any], shape: str
) -> None:
    """Records whose answers are recognised / records = 1 for each shape, with usage read on both arms."""
    incumbent, candidate = await upstreams(server), await upstreams(server)
    sections = {"incumbent": {"url": incumbent.url}, "candidate": {"url": candidate.url}}
    proxy = await proxies(**sections, record={"redis_url": redis_url})
    assert await post_json(proxy.port, path, request_body, n=4) == [200] * 4
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == 4)
    summary = (await compare_all(make_config(**sections, record={"redis_url": redis_url}), redis_url))["summary"]
    for arm in ("incumbent", "candidate"):
        answers = summary["answers"][arm]
        assert answers["shapes"] == {shape: 4} and answers["recognised_share"] == 1.0
        assert answers["parse_errors"] == {}
    assert summary["divergence"]["pairs_compared"] == 4 and summary["divergence"]["candidate_rate"] == 0.0
    assert summary["cost"]["estimated_share"] == 0.0  # every answer here reports its usage


async def test_feedback_counts_only_for_the_candidate_the_canary_serves(redis_url, redis_client) -> None:
    """Users only ever saw the canary's candidate: another candidate's report has no satisfaction data."""
    window = int(time.time() // 60) * 60
    redis_client.hset(
        f"{{shadow}}:fb:{window}", mapping={"scored:candidate": 4, "sum:candidate": 3.2, "n:candidate": 4}
    )
    candidates = [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2"}]
    config = make_config(record={"redis_url": redis_url}, candidate=candidates, canary={"candidate": "a"})
    served = (await load_report(config, redis_url, since_seconds=600, candidate="a")).as_json()
    other = (await load_report(config, redis_url, since_seconds=600, candidate="b")).as_json()
    assert served["summary"]["satisfaction"]["candidate"]["scored"] == 4
    assert other["summary"]["satisfaction"]["candidate"]["scored"] == 0

"""Semantic similarity through an embeddings endpoint: scored beside lexical, cached, bounded, and optional."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.comparator.report_loader import load_report
from proxy.comparator.worker import Worker
from proxy.config import Config, load_config, masked

from .conftest import Handler, eventually, make_config
from .models import openai_chat
from .test_candidates import everything_in_redis, post_json

SECRET = "emb-key-3d9b41a0"
PARIS = "paris is the capital of france"
PARAPHRASE = "the french capital is paris"  # other words, same meaning
OTHER = "i cannot help with that request sorry"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "capital of France?"}]}


STOP_WORDS = frozenset({"the", "is", "of", "a", "an", "its", "that", "with"})
SYNONYMS = {"french": "france"}


def bag_of_words(text: str, dims: int = 64) -> list[float]:
    """A toy meaning: stop words dropped, synonyms folded, each remaining word hashed into one of dims counts."""
    vector = [0.0] * dims
    for found in re.findall(r"\w+", text.lower()):
        if found in STOP_WORDS:
            continue
        word = SYNONYMS.get(found, found)
        vector[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % dims] += 1.0
    return vector


def embeddings_server(*, delay: float = 0.0, status: int = 200, garbage: bool = False) -> Handler:
    """An OpenAI-compatible /v1/embeddings that embeds by bag of words (or is slow, failing, or nonsensical)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if delay:
            await asyncio.sleep(delay)
        if status != 200:
            return web.json_response({"error": {"message": "overloaded"}}, status=status)
        if garbage:
            return web.json_response({"data": [{"index": 0, "embedding": "not a vector"}]})
        data = [{"object": "embedding", "index": i, "embedding": bag_of_words(t)} for i, t in enumerate(body["input"])]
        return web.json_response({"object": "list", "data": data, "model": body.get("model", "bow")})

    return handler


def texts_sent(requests: list[dict[str, Any]]) -> list[str]:
    return [text for r in requests for text in json.loads(r["body"])["input"]]


async def produce(upstreams, proxies, redis_url: str, n: int, **answers: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """n chat requests through the real proxy, each with an A/A copy, to candidates answering as named."""
    incumbent = await upstreams(openai_chat(PARIS.split()))
    candidates = [{"name": n, "url": (await upstreams(openai_chat(text.split()))).url} for n, text in answers.items()]
    sections = {"incumbent": {"url": incumbent.url}, "record": {"redis_url": redis_url}, "candidate": candidates}
    proxy = await proxies(**sections, compare={"noise_sample_rate": 1.0})
    assert await post_json(proxy.port, "/v1/chat/completions", CHAT, n=n) == [200] * n
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == n)
    return sections


def semantic_config(sections: dict[str, Any], url: str, **semantic: Any) -> Config:
    return make_config(**sections, compare={"semantic": {"url": url, **semantic}})


async def burst(worker: Worker) -> None:
    try:
        await worker.run(burst=True)
    finally:
        await worker.close()


async def report_for(config: Config, redis_url: str, candidate: str) -> dict[str, Any]:
    report = (await load_report(config, redis_url, since_seconds=3600, candidate=candidate)).as_json()
    return dict(report["summary"]["divergence"])


async def test_a_paraphrase_is_semantically_close_and_a_different_answer_far(upstreams, proxies, redis_url) -> None:
    """Both measures side by side: reordered words score ~1 semantically, another answer scores low on both."""
    embedder = await upstreams(embeddings_server())
    sections = await produce(upstreams, proxies, redis_url, 10, para=PARAPHRASE, other=OTHER)
    config = semantic_config(sections, f"{embedder.url}/v1", model="bow")
    worker = Worker(config, redis_url)
    await burst(worker)
    para, other = await report_for(config, redis_url, "para"), await report_for(config, redis_url, "other")
    assert para["semantic_pairs"] == other["semantic_pairs"] == 10
    assert para["semantic_noise_pairs"] == 10 and para["semantic_noise_mean_similarity"] == 1.0
    assert para["semantic_mean_similarity"] > 0.99 > para["mean_similarity"]
    assert other["semantic_mean_similarity"] < 0.3 and other["mean_similarity"] < 0.5
    assert para["semantic_fallbacks"] == {} and worker.progress.semantic_fallbacks == {}
    assert {json.loads(r["body"])["model"] for r in embedder.requests} == {"bow"}
    assert sorted(texts_sent(embedder.requests)) == sorted([PARIS, PARAPHRASE, OTHER])  # A/A texts are equal


async def test_a_text_seen_before_is_not_sent_again(upstreams, proxies, redis_url) -> None:
    """The cache by content hash: later batches, and later runs of the same worker, reuse the embeddings."""
    embedder = await upstreams(embeddings_server())
    sections = await produce(upstreams, proxies, redis_url, 12, para=PARAPHRASE)
    config = make_config(**sections, compare={"batch_size": 3, "semantic": {"url": embedder.url, "batch_size": 1}})
    worker = Worker(config, redis_url)
    await worker.run(burst=True)  # four batches of three records
    assert len(embedder.requests) == 2 and sorted(texts_sent(embedder.requests)) == sorted([PARIS, PARAPHRASE])
    await produce(upstreams, proxies, redis_url, 6, para=PARAPHRASE)
    await burst(worker)
    assert len(embedder.requests) == 2
    assert (await report_for(config, redis_url, "para"))["semantic_pairs"] == 18


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        (None, "unavailable"),
        (embeddings_server(delay=3.0), "timeout"),
        (embeddings_server(status=503), "http_5xx"),
        (embeddings_server(status=401), "http_4xx"),
        (embeddings_server(garbage=True), "bad_answer"),
    ],
    ids=["down", "slow", "overloaded", "refused", "garbage"],
)
async def test_an_endpoint_that_fails_leaves_the_lexical_scores_counted(
    upstreams, proxies, redis_url, server: Handler | None, reason: str
) -> None:
    """Down, slow, erroring or nonsensical: the batch is scored lexically within the timeout, and counted."""
    url = closed_port_url() if server is None else (await upstreams(server)).url
    sections = await produce(upstreams, proxies, redis_url, 8, para=PARAPHRASE)
    config = semantic_config(sections, url, timeout=0.3)
    worker = Worker(config, redis_url)
    started = time.monotonic()
    await burst(worker)
    assert time.monotonic() - started < 2.5  # the slow endpoint answers after 3 s: nobody waited for it
    divergence = await report_for(config, redis_url, "para")
    assert divergence["pairs_compared"] == 8 and divergence["mean_similarity"] is not None
    assert divergence["semantic_pairs"] == 0 and divergence["semantic_mean_similarity"] is None
    assert divergence["semantic_fallbacks"] == {reason: 8}  # the candidate pairs (the A/A texts need no call)
    assert worker.progress.semantic_fallbacks == {reason: 1}


async def test_the_api_key_reaches_the_endpoint_and_is_stored_nowhere(
    upstreams, proxies, redis_url, redis_client
) -> None:
    """api_key = "${EMBEDDINGS_API_KEY}" is read from the environment, sent as a bearer token, never kept."""
    embedder = await upstreams(embeddings_server())
    sections = await produce(upstreams, proxies, redis_url, 4, para=PARAPHRASE)
    overrides = {**sections, "compare": {"semantic": {"url": embedder.url, "api_key": "${EMBEDDINGS_API_KEY}"}}}
    config = load_config(None, environ={"EMBEDDINGS_API_KEY": SECRET}, overrides=overrides)
    await burst(Worker(config, redis_url))
    assert {dict(r["headers"])["Authorization"] for r in embedder.requests} == {f"Bearer {SECRET}"}
    assert (await report_for(config, redis_url, "para"))["semantic_pairs"] == 4
    assert SECRET.encode() not in everything_in_redis(redis_client)
    assert SECRET not in repr(config) and SECRET.encode() not in orjson.dumps(masked(config))


def test_an_unset_key_variable_is_a_config_error_that_does_not_echo_the_value() -> None:
    """A missing variable names the key and the variable; a rejected value is masked."""
    with pytest.raises(ValueError, match=r"compare\.semantic\.api_key .*EMBEDDINGS_API_KEY is not set") as caught:
        load_config(None, environ={}, overrides={"compare": {"semantic": {"api_key": "${EMBEDDINGS_API_KEY}"}}})
    assert "${EMBEDDINGS_API_KEY}" not in str(caught.value)


async def test_without_a_url_no_semantic_figures_are_counted(upstreams, proxies, redis_url) -> None:
    """Off by default: the report has the lexical figures and empty semantic ones."""
    sections = await produce(upstreams, proxies, redis_url, 4, para=PARAPHRASE)
    config = make_config(**sections)
    assert config.compare.semantic.url == ""
    await burst(Worker(config, redis_url))
    divergence = await report_for(config, redis_url, "para")
    assert divergence["pairs_compared"] == 4 and divergence["semantic_pairs"] == 0
    assert divergence["semantic_fallbacks"] == {} and divergence["semantic_mean_similarity"] is None

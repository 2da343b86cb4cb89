"""The pairwise judge: blind, shuffled, calibrated on A/A pairs, bounded in spend, and gated on win rate."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.comparator import monitoring, verdict
from proxy.comparator import sequential as sq
from proxy.comparator.judge import outcome, sampled, swapped, winner
from proxy.comparator.report_loader import load_report
from proxy.comparator.verdict import Gate, correct_segments, evaluate
from proxy.comparator.worker import Worker
from proxy.config import Config, ConfigError, GatesConfig, load_config, masked

from .conftest import Handler, eventually, make_config
from .models import openai_chat
from .test_candidates import everything_in_redis, post_json
from .test_config import _cli, _write

SECRET = "judge-key-5c1e77b2"
PLAIN = "paris is the capital of france"
LIKED = "paris is the capital of france verified by the atlas"  # the fake judge prefers "verified"
DISLIKED = "paris maybe unsure"  # and dislikes "unsure"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "capital of France?"}]}
_SHOWN = re.compile(r"Answer A:\n<<<\n(.*?)\n>>>\n\nAnswer B:\n<<<\n(.*?)\n>>>", re.DOTALL)


def liking(text: str) -> int:
    return ("verified" in text) - ("unsure" in text)


def judge_server(*, biased: bool = False, seed: int = 7, usage: dict[str, int] | None = None) -> Handler:
    """An OpenAI-compatible chat endpoint that judges by a known taste: it prefers the answer with "verified",
    dislikes "unsure", and otherwise flips a fair coin (or, ``biased``, always picks the answer shown first)."""
    coin = random.Random(seed)

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        match = _SHOWN.search(body["messages"][-1]["content"])
        assert match is not None
        a, b = liking(match.group(1)), liking(match.group(2))
        if a != b:
            pick = "A" if a > b else "B"
        else:
            pick = "A" if biased else coin.choice(["A", "B", "tie"])
        message = {"role": "assistant", "content": json.dumps({"winner": pick})}
        answer = {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        return web.json_response({**answer, "usage": usage or {"prompt_tokens": 200, "completion_tokens": 8}})

    return handler


async def produce(upstreams, proxies, redis_url: str, n: int, **answers: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """n chat requests through the real proxy, each with an A/A copy, to candidates answering as named."""
    incumbent = await upstreams(openai_chat(PLAIN.split()))
    candidates = [{"name": n, "url": (await upstreams(openai_chat(text.split()))).url} for n, text in answers.items()]
    sections = {"incumbent": {"url": incumbent.url}, "record": {"redis_url": redis_url}, "candidate": candidates}
    proxy = await proxies(**sections, compare={"noise_sample_rate": 1.0})
    assert await post_json(proxy.port, "/v1/chat/completions", CHAT, n=n) == [200] * n
    await eventually(lambda: proxy.runtime.metrics.value("shadow_proxy_records_written_total") == n)
    return sections


def judge_config(sections: dict[str, Any], url: str, **judge: Any) -> Config:
    return make_config(**sections, compare={"judge": {"url": f"{url}/v1", "sample_rate": 1.0, **judge}})


async def burst(worker: Worker) -> None:
    try:
        await worker.run(burst=True)
    finally:
        await worker.close()


async def report_for(config: Config, redis_url: str, candidate: str) -> dict[str, Any]:
    return (await load_report(config, redis_url, since_seconds=3600, candidate=candidate)).as_json()


def judge_gate(report: dict[str, Any]) -> dict[str, Any]:
    return next(g for g in report["verdict"]["gates"] if g["name"] == "judge")


async def test_the_win_rate_gate_sees_the_judges_known_preference(upstreams, proxies, redis_url) -> None:
    """A candidate whose answers the judge prefers passes the judge gate; one it dislikes fails it."""
    judge = await upstreams(judge_server())
    sections = await produce(upstreams, proxies, redis_url, 40, liked=LIKED, disliked=DISLIKED)
    config = judge_config(sections, judge.url, model="judge-1", max_in_flight=8)
    await burst(Worker(config, redis_url))
    liked, disliked = await report_for(config, redis_url, "liked"), await report_for(config, redis_url, "disliked")
    assert liked["summary"]["judge"]["wins"] == 40 and liked["summary"]["judge"]["win_rate"] == 1.0
    assert disliked["summary"]["judge"]["losses"] == 40 and disliked["summary"]["judge"]["win_rate"] == 0.0
    assert judge_gate(liked)["outcome"] == "pass" and judge_gate(disliked)["outcome"] == "fail"
    low, high = disliked["summary"]["judge"]["win_rate_interval"]
    assert 0.0 == low < high < 0.1  # Clopper-Pearson: 0 of 40
    assert {c["name"]: c["gates"]["judge"] for c in liked["candidates"]} == {"liked": "pass", "disliked": "fail"}


async def test_the_judge_sees_both_answers_blind_in_shuffled_order(upstreams, proxies, redis_url) -> None:
    """The judge gets the prompt and two answers labelled A and B only, asked for JSON; the order varies."""
    judge = await upstreams(judge_server())
    sections = await produce(upstreams, proxies, redis_url, 20, liked=LIKED)
    config = judge_config(sections, judge.url, model="judge-1")
    await burst(Worker(config, redis_url))
    bodies = [json.loads(r["body"]) for r in judge.requests]
    assert len(bodies) == 40  # 20 candidate pairs and 20 A/A pairs
    assert {b["model"] for b in bodies} == {"judge-1"}
    assert all(b["response_format"] == {"type": "json_object"} for b in bodies)
    prompts = [b["messages"][-1]["content"] for b in bodies]
    assert all("capital of France?" in p and "incumbent" not in p and "candidate" not in p for p in prompts)
    candidate_first = [_SHOWN.search(p).group(1) == LIKED for p in prompts if LIKED in p]  # type: ignore[union-attr]
    assert 0 < sum(candidate_first) < len(candidate_first) == 20


async def test_a_fair_judge_is_calibrated_near_even_on_aa_pairs(upstreams, proxies, redis_url) -> None:
    """Incumbent against its own A/A copy: a fair judge picks either position about as often."""
    judge = await upstreams(judge_server())
    sections = await produce(upstreams, proxies, redis_url, 60, plain=PLAIN)
    config = judge_config(sections, judge.url, max_in_flight=8)
    await burst(Worker(config, redis_url))
    found = (await report_for(config, redis_url, "plain"))["summary"]["judge"]
    calibration = found["calibration"]
    assert calibration["pairs"] == 60 and calibration["first"] + calibration["second"] + calibration["ties"] == 60
    assert 0.25 < calibration["first_share"] < 0.75
    assert 0.3 < found["position_bias"] < 0.7


async def test_a_judge_with_a_position_bias_shows_it(upstreams, proxies, redis_url) -> None:
    """A judge that always picks the answer shown first: A/A calibration 100% first, position bias 1.0."""
    judge = await upstreams(judge_server(biased=True))
    sections = await produce(upstreams, proxies, redis_url, 30, plain=PLAIN)
    config = judge_config(sections, judge.url, max_in_flight=8)
    await burst(Worker(config, redis_url))
    found = (await report_for(config, redis_url, "plain"))["summary"]["judge"]
    assert found["calibration"] == {"pairs": 30, "first": 30, "second": 0, "ties": 0, "first_share": 1.0}
    assert found["position_bias"] == 1.0
    # Shown first by a fair coin, the candidate still wins about half: the bias does not favour an arm.
    assert 0.2 < found["win_rate"] < 0.8


async def test_the_api_key_reaches_the_judge_and_is_stored_nowhere(upstreams, proxies, redis_url, redis_client) -> None:
    """api_key = "${JUDGE_API_KEY}" is read from the environment, sent as a bearer token, never kept."""
    judge = await upstreams(judge_server())
    sections = await produce(upstreams, proxies, redis_url, 4, liked=LIKED)
    overrides = {
        **sections,
        "compare": {"judge": {"url": judge.url, "api_key": "${JUDGE_API_KEY}", "sample_rate": 1.0}},
    }
    config = load_config(None, environ={"JUDGE_API_KEY": SECRET}, overrides=overrides)
    await burst(Worker(config, redis_url))
    assert {dict(r["headers"])["Authorization"] for r in judge.requests} == {f"Bearer {SECRET}"}
    assert (await report_for(config, redis_url, "liked"))["summary"]["judge"]["wins"] == 4
    assert SECRET.encode() not in everything_in_redis(redis_client)
    assert SECRET not in repr(config) and SECRET.encode() not in orjson.dumps(masked(config))


async def test_the_budget_stops_judging_and_counts_the_pairs_left(upstreams, proxies, redis_url) -> None:
    """At 0.2 per verdict (200 tokens at 1.0 per 1k), a budget of 0.7 an hour judges a few pairs, then none."""
    judge = await upstreams(judge_server())
    sections = await produce(upstreams, proxies, redis_url, 10, liked=LIKED)
    config = judge_config(
        sections, judge.url, budget_per_hour=0.7, max_in_flight=1, price={"input_per_1k": 1.0, "output_per_1k": 0.0}
    )
    worker = Worker(config, redis_url)
    await burst(worker)
    found = (await report_for(config, redis_url, "liked"))["summary"]["judge"]
    judged = len(judge.requests)
    assert 1 <= judged <= 3 and found["cost"] == pytest.approx(0.2 * judged) and found["cost"] <= 0.7
    assert found["judged_pairs"] + found["calibration"]["pairs"] == judged
    assert found["skipped"] == {"budget": 20 - judged}
    assert worker.progress.judge_skipped == {"budget": 20 - judged} and worker.progress.judged == judged


async def test_without_judged_pairs_the_gate_is_skipped_with_the_reason(upstreams, proxies, redis_url) -> None:
    """A judge that is down judges nothing: the gate is skipped and says why."""
    sections = await produce(upstreams, proxies, redis_url, 4, liked=LIKED)
    config = judge_config(sections, "http://127.0.0.1:9", timeout=2.0)
    await burst(Worker(config, redis_url))
    report = await report_for(config, redis_url, "liked")
    gate = judge_gate(report)
    assert gate["outcome"] == "skipped" and "unavailable 8" in gate["rule"]


def test_without_a_judge_there_is_no_judge_gate() -> None:
    """Counters no judge looked at carry no judge gate; judged ones do."""
    assert "judge" not in {g.name for g in evaluate({"n": 5.0}, [], GatesConfig())}
    assert "judge" in {g.name for g in evaluate({"n": 5.0, "judge:cand:win": 1.0}, [], GatesConfig())}


@pytest.mark.parametrize("arm", ["incumbent", "candidate"])
def test_a_judge_that_is_also_an_arm_is_refused(tmp_path: Path, arm: str) -> None:
    """check-config exits 2 naming compare.judge.url when the judge's URL is an arm's (normalised)."""
    text = (
        f'[{arm}]\nurl = "http://Models.internal:80"\n'
        + ('[incumbent]\nurl = "http://other:1"\n' if arm == "candidate" else "")
        + '[compare.judge]\nurl = "http://models.internal/v1/"\n'
    )
    result = _cli("check-config", str(_write(tmp_path, text)))
    assert result.returncode == 2, result.stdout
    assert "compare.judge.url" in result.stderr and "also one of the arms" in result.stderr


def test_a_judge_elsewhere_is_accepted() -> None:
    """Another host or port is not an arm."""
    overrides = {"incumbent": {"url": "http://models"}, "compare": {"judge": {"url": "http://models:8001/v1"}}}
    assert load_config(None, environ={}, overrides=overrides).compare.judge.url == "http://models:8001/v1"
    same = {**overrides, "compare": {"judge": {"url": "http://MODELS:80/v1/"}}}
    with pytest.raises(ConfigError, match=r"compare\.judge\.url .*also one of the arms \(the incumbent\)"):
        load_config(None, environ={}, overrides=same)


def test_sampling_and_order_are_reproducible_hashes_of_the_record() -> None:
    """The same record id is always sampled the same way and shown in the same order; the rate holds."""
    ids = [f"req-{i}" for i in range(20_000)]
    share = sum(sampled(i, 0.05) for i in ids) / len(ids)
    assert 0.04 < share < 0.06 and [sampled(i, 0.05) for i in ids[:50]] == [sampled(i, 0.05) for i in ids[:50]]
    first = sum(swapped((i, "cand:x")) for i in ids) / len(ids)
    assert 0.48 < first < 0.52


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"winner": "A"}', "A"),
        ('```json\n{"winner": "b"}\n```', "B"),
        ("Tie", "tie"),
        ('I think {"winner":"B"} because', "B"),
        ("winner: A", "A"),
    ],
)
def test_the_reply_is_read_leniently(reply: str, expected: str) -> None:
    """JSON as asked, fenced, bare or embedded in prose: the verdict is found."""
    assert winner(reply) == expected


def test_a_reply_without_a_verdict_is_a_bad_answer() -> None:
    """Nothing that names A, B or tie: the pair is counted as bad_answer."""
    with pytest.raises(Exception, match="bad_answer"):
        winner("Both answers are fine.")


def test_positions_map_back_to_the_candidate() -> None:
    """Whichever side the candidate was shown on, picking it is a win."""
    key = ("r1", "cand:x")
    candidate_position = "A" if swapped(key) else "B"
    other = "B" if candidate_position == "A" else "A"
    assert (outcome(key, candidate_position), outcome(key, other), outcome(key, "tie")) == ("win", "loss", "tie")
    assert (outcome(("r1", "aa"), "A"), outcome(("r1", "aa"), "B")) == ("first", "second")


@pytest.mark.parametrize(("wins", "losses", "expected"), [(180, 20, "pass"), (20, 180, "fail"), (3, 3, "inconclusive")])
def test_the_canary_decides_the_judge_gate_on_a_confidence_sequence(wins: int, losses: int, expected: str) -> None:
    """Under continuous monitoring the win rate is decided on an always-valid proportion sequence."""
    counters = {"judge:cand:win": float(wins), "judge:cand:loss": float(losses)}
    gate = monitoring.judge_gate(counters, GatesConfig(), sq.split_alpha(0.05, 6, 6), sq.DEFAULT_T_STAR)
    assert gate.outcome == expected and gate.method == sq.METHOD


def test_a_segments_judge_fail_goes_through_benjamini_hochberg() -> None:
    """A marginal fail in one of many segments is demoted when it is not a discovery after correction."""
    marginal = judge_gate_of({"judge:cand:win": 29.0, "judge:cand:loss": 71.0})  # p = 0.015
    clear = judge_gate_of({"judge:cand:win": 2.0, "judge:cand:loss": 98.0})
    assert marginal.outcome == clear.outcome == "fail" and marginal.p_value is not None
    neutral = [[judge_gate_of({"judge:cand:win": 50.0, "judge:cand:loss": 50.0})] for _ in range(40)]
    correct_segments([[marginal], [clear], *neutral], 0.05)
    assert (marginal.outcome, clear.outcome) == ("inconclusive", "fail")


def judge_gate_of(counters: dict[str, float]) -> Gate:
    return verdict.judge_gate(counters, GatesConfig())

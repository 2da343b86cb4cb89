"""Per-arm request shaping: the model field and headers, rewritten only when a rule applies."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.config import UpstreamConfig
from proxy.shaping import Shaping


def _shaping(**values: Any) -> Shaping:
    return Shaping.from_config(UpstreamConfig.model_validate(values, context={"environ": {"KEY": "s3cret"}}))


def test_an_arm_without_rules_gets_the_very_same_bytes() -> None:
    """No rules: the body object and the headers are passed through untouched."""
    body = b'{"model": "gpt-4o-mini", "messages": []}'
    headers = [("Authorization", "Bearer client")]
    shaped = _shaping().apply(body, headers)
    assert shaped.body is body and shaped.headers is headers and shaped.model is None


def test_a_fixed_model_name_replaces_the_incoming_one_and_keeps_everything_else() -> None:
    """model = "x" rewrites the field; every other field and its order survive the re-encoding."""
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "h\\u00e9"}], "temperature": 0.7}'
    shaped = _shaping(model="Qwen/Qwen2.5-7B").apply(body, [])
    assert shaped.model == "Qwen/Qwen2.5-7B"
    doc = orjson.loads(shaped.body)
    assert list(doc) == ["model", "messages", "temperature"]
    assert doc == {**orjson.loads(body), "model": "Qwen/Qwen2.5-7B"}


def test_a_model_map_uses_its_entry_then_its_default_then_leaves_the_name() -> None:
    """A map rewrites known names, "*" catches the rest, and without "*" unknown names pass unchanged."""
    mapped = _shaping(model={"gpt-4o-mini": "gpt-4.1-mini", "*": "gpt-4.1"})
    assert mapped.model_for("gpt-4o-mini") == "gpt-4.1-mini"
    assert mapped.model_for("o3") == "gpt-4.1"
    strict = _shaping(model={"gpt-4o-mini": "gpt-4.1-mini"})
    body = b'{"model": "o3"}'
    assert strict.apply(body, []).body is body


def test_bodies_that_are_not_json_objects_with_a_model_pass_unchanged() -> None:
    """Text, arrays, JSON without a model, or a model that is not a string are sent byte for byte."""
    shaping = _shaping(model="m")
    for body in (b"", b"plain text", b'["model"]', b'{"input": "x"}', b'{"model": 5}', b'{"model": "m"}', b"{bad"):
        shaped = shaping.apply(body, [])
        assert shaped.body is body and shaped.model is None


def test_integers_beyond_64_bits_survive_a_rewrite() -> None:
    """A body orjson cannot hold is rewritten through the standard library, numbers intact."""
    shaped = _shaping(model="m").apply(b'{"model": "a", "seed": 123456789012345678901234567890}', [])
    assert shaped.model == "m" and b"123456789012345678901234567890" in shaped.body


def test_headers_are_removed_and_set_case_insensitively() -> None:
    """remove_headers drops the client's headers; set_headers replaces them with the arm's own values."""
    shaping = _shaping(remove_headers=["OpenAI-Organization"], set_headers={"Authorization": "Bearer ${KEY}"})
    shaped = shaping.apply(b"{}", [("authorization", "Bearer client"), ("openai-organization", "o"), ("x-a", "1")])
    assert shaped.headers == [("x-a", "1"), ("authorization", "Bearer s3cret")]


def test_bodies_orjson_cannot_hold_are_rewritten_faithfully() -> None:
    """A lone surrogate escape and a huge integer survive a rewrite (the standard library writes them back)."""
    body = b'{"model": "a", "text": "\\ud800", "seed": 1234567890123456789012}'
    shaped = _shaping(model="m").apply(body, [])
    assert shaped.model == "m"
    assert b'"\\ud800"' in shaped.body and b"1234567890123456789012" in shaped.body


def test_the_shaping_repr_shows_no_credential() -> None:
    """A Shaping printed in a log or a traceback does not show the header values it sets."""
    assert "s3cret" not in repr(_shaping(set_headers={"Authorization": "Bearer ${KEY}"}))

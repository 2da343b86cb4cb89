"""Pair metrics as pure functions, table by table."""

from __future__ import annotations

import pytest

from proxy.comparator.measures import (
    Tolerance,
    arm_cost,
    compare,
    cosine,
    exact_match,
    json_diff,
    normalise_text,
    text_similarity,
    token_similarity,
)
from proxy.comparator.parse import Arm, Output, Record
from proxy.comparator.pricing import PriceBook

TOL = Tolerance(frozenset({"id", "created"}), abs_tol=1e-6, rel_tol=1e-3)


def _arm(output: Output, *, status: int = 200, error: str | None = None, duration: float = 10.0) -> Arm:
    return Arm("incumbent", "live", status, error, duration, 2.0, 5.0, None, False, output)


@pytest.mark.parametrize(
    ("a", "b", "diffs"),
    [
        ({"x": 1, "id": "a"}, {"x": 1, "id": "b"}, []),
        ({"x": 1.0}, {"x": 1.0005}, []),
        ({"x": 1.0}, {"x": 1.01}, ["x"]),
        ({"x": [1, 2]}, {"x": [1, 3]}, ["x.1"]),
        ({"x": [1, 2]}, {"x": [1]}, ["x.length"]),
        ({"x": {"y": "a"}}, {"x": {"y": "b"}}, ["x.y"]),
        ({"x": 1}, {"z": 1}, ["x", "z"]),
        ({"x": True}, {"x": 1}, ["x"]),
        ({"created": 1, "choices": [{"id": 1}]}, {"created": 2, "choices": [{"id": 2}]}, []),
    ],
)
def test_json_field_differences(a: object, b: object, diffs: list[str]) -> None:
    """Differing fields by path, with ignore paths and numeric tolerance."""
    assert list(json_diff(a, b, TOL)) == diffs


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (Output("chat", text="Hello  world\n"), Output("chat", text="Hello world"), True),
        (Output("chat", text="Hello"), Output("chat", text="Hi"), False),
        (Output("chat", text="", tool_calls=(("f", "{}"),)), Output("chat", text="", tool_calls=(("g", "{}"),)), False),
        (Output("embedding", embeddings=((1.0, 2.0),)), Output("embedding", embeddings=((1.0, 2.0000001),)), True),
        (Output("embedding", embeddings=((1.0, 2.0),)), Output("embedding", embeddings=((1.0, 2.5),)), False),
        (Output("json", document={"a": 1}), Output("json", document={"a": 1}), True),
        (Output("text", text="x"), Output("text", text="y"), False),
        (Output("empty"), Output("empty"), True),
    ],
)
def test_exact_match_after_normalisation(a: Output, b: Output, same: bool) -> None:
    """Exact match per kind: normalised text, tool calls, tolerant vectors, JSON documents."""
    assert exact_match(a, b, TOL)[0] is same


@pytest.mark.parametrize(
    ("a", "b", "chars", "tokens"),
    [
        ("the cat sat", "the cat sat", 1.0, 1.0),
        ("the cat sat", "the dog sat", 0.727, 0.667),
        ("abc", "xyz", 0.0, 0.0),
    ],
)
def test_text_similarity_measures(a: str, b: str, chars: float, tokens: float) -> None:
    """Character-level (Indel ratio) and word-level (Levenshtein) similarity in [0, 1]."""
    assert text_similarity(a, b) == pytest.approx(chars, abs=1e-3)
    assert token_similarity(a, b) == pytest.approx(tokens, abs=1e-3)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 0.0], [1.0, 0.0], 1.0),
        ([1.0, 0.0], [0.0, 1.0], 0.0),
        ([1.0, 1.0], [-1.0, -1.0], -1.0),
        ([1.0], [1.0, 2.0], None),
        ([0.0, 0.0], [1.0, 1.0], None),
    ],
)
def test_cosine(a: list[float], b: list[float], expected: float | None) -> None:
    """Cosine similarity of embeddings; None when not comparable."""
    result = cosine(a, b)
    assert result == pytest.approx(expected) if expected is not None else result is None


def test_cost_from_usage_and_counted_without_it() -> None:
    """Cost uses the usage block and the price per 1k tokens; without usage the tokens are counted and marked."""
    book = PriceBook((1.0, 2.0))
    record = Record("r", 0.0, "/*", "gpt-4o", False, "hello world")
    priced = arm_cost(_arm(Output("chat", text="x", prompt_tokens=1000, completion_tokens=500)), record, book)
    assert (priced.amount, priced.source, priced.estimated) == (2.0, "table", False)
    counted = arm_cost(_arm(Output("chat", text="hello world")), record, book)
    # o200k_base (gpt-4o's tokenizer): "hello world" is 2 tokens, as prompt and as answer.
    assert counted.estimated and counted.output_tokens == 2
    assert counted.amount == pytest.approx((2 * 1.0 + 2 * 2.0) / 1000)


def test_cost_from_the_maintained_price_list_and_unknown_models() -> None:
    """Without a table a known model is priced from the price list; an unknown one stays unpriced."""
    record = Record("r", 0.0, "/*", "-", False, "")
    known = arm_cost(
        _arm(Output("chat", text="x", model="gpt-4o-mini", prompt_tokens=10, completion_tokens=5)),
        record,
        PriceBook(None),
    )
    assert known.amount is not None and known.amount > 0 and known.source.startswith("genai-prices:")
    unknown = arm_cost(
        _arm(Output("chat", text="x", model="my-own-llama", prompt_tokens=10, completion_tokens=5)),
        record,
        PriceBook(None),
    )
    assert (unknown.amount, unknown.source) == (None, "unknown")


def test_structured_outputs_are_compared_field_by_field() -> None:
    """JSON-mode answers that differ only in formatting or key order are equal; a changed field is named."""
    a = Output("chat", text='{"a": 1, "b": [1, 2]}', document={"a": 1, "b": [1, 2]})
    same = Output("chat", text='{"b":[1,2],"a":1}', document={"b": [1, 2], "a": 1})
    other = Output("chat", text='{"a": 2, "b": [1, 2]}', document={"a": 2, "b": [1, 2]})
    assert exact_match(a, same, TOL) == (True, ())
    assert exact_match(a, other, TOL) == (False, ("a",))


def test_compare_counts_errors_apart_from_divergence() -> None:
    """A failed arm is an outcome difference, not a divergence; latency deltas are candidate - incumbent."""
    ok = _arm(Output("chat", text="same", completion_tokens=3), duration=10.0)
    failed = _arm(Output("json", document={"error": {}}), status=500, duration=30.0)
    metrics = compare(ok, failed, TOL)
    assert (metrics.outcome_base, metrics.outcome_other, metrics.diverged) == (None, "http_5xx", False)
    assert metrics.latency_delta_ms == 20.0 and metrics.status_match is False
    same = compare(ok, _arm(Output("chat", text="same", completion_tokens=4), duration=12.5), TOL)
    assert same.exact_match and not same.diverged and same.output_tokens_delta == 1
    assert same.latency_delta_ms == 2.5 and same.text_similarity == 1.0


def test_label_and_tool_call_agreement() -> None:
    """Classifier labels and tool calls are compared when present, None otherwise."""
    a = _arm(Output("json", document={"label": "spam"}, label="spam"))
    b = _arm(Output("json", document={"label": "ham"}, label="ham"))
    assert compare(a, b, TOL).label_match is False
    assert compare(a, a, TOL).label_match is True
    assert compare(_arm(Output("chat", text="x")), _arm(Output("chat", text="x")), TOL).tool_calls_match is None


def test_normalise_text() -> None:
    """Whitespace runs collapse and ends are stripped."""
    assert normalise_text("  a \n\t b  ") == "a b"

"""Similarity scores by output type, table by table, and why text is scored by word trigrams."""

from __future__ import annotations

import functools
import timeit
from pathlib import Path

import pytest
from rapidfuzz import fuzz
from rapidfuzz.distance import Indel

from proxy.comparator.measures import Tolerance, exact_match
from proxy.comparator.parse import parse_body
from proxy.comparator.shapes import Output
from proxy.comparator.similarity import (
    BELOW_ONE,
    BUCKETS,
    IDENTICAL,
    bucket,
    bucket_value,
    document_score,
    score,
    text_score,
)

TOL = Tolerance(frozenset({"id", "created", "usage", "model"}), abs_tol=1e-6, rel_tol=1e-3)
PAYLOADS = Path(__file__).parent / "payloads"

# (question's answer, a paraphrase of it, an answer to another question): real English, written by hand.
ANSWERS = [
    (
        "The capital of France is Paris, which is also its largest city.",
        "Paris is the capital of France and also its largest city.",
        "The tallest mountain on Earth is Everest, which is in the Himalayas.",
    ),
    (
        "To reset your password, open Settings, choose Security and click 'Reset password'. "
        "You will receive an email with a link.",
        "Go to Settings > Security and select Reset password; a link will be emailed to you.",
        "To change your shipping address, open Orders, choose the order and click 'Edit address'. "
        "You will see a confirmation.",
    ),
    (
        "Water boils at 100 degrees Celsius at sea level, but at lower temperatures at high altitude.",
        "At sea level water boils at 100 °C; at high altitude the boiling point is lower.",
        "Iron melts at about 1538 degrees Celsius, and it is the most common element on Earth by mass.",
    ),
    (
        "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make glucose "
        "and release oxygen.",
        "Plants make glucose from carbon dioxide and water using the energy of sunlight, releasing oxygen: "
        "this is photosynthesis.",
        "Mitosis is the process by which a cell divides its nucleus and copies its chromosomes to make two "
        "identical cells.",
    ),
    (
        "You can cancel your subscription at any time from the Billing page; the cancellation takes effect at "
        "the end of the current period.",
        "Subscriptions can be cancelled whenever you like on the Billing page. It takes effect when the current "
        "billing period ends.",
        "I'm sorry, but I can't help with that request. Please contact the support team for further assistance.",
    ),
    (
        "The function returns None when the list is empty, otherwise it returns the largest element.",
        "If the list is empty the function returns None; otherwise it gives back the largest element.",
        "The loop iterates over the dictionary keys and prints each one on a separate line.",
    ),
]


def _words(text: str) -> list[str]:
    return sorted(text.lower().replace(",", " ").replace(".", " ").split())


MEASURES = {
    "word trigram dice (score)": text_score,
    "word dice": lambda a, b: Indel.normalized_similarity(_words(a), _words(b)),
    "token_set_ratio": lambda a, b: fuzz.token_set_ratio(a, b) / 100,
    "character ratio": lambda a, b: fuzz.ratio(a, b) / 100,
}


def separation(measure: str) -> tuple[float, float]:
    """(lowest paraphrase score, highest different-answer score) of a text measure on ANSWERS."""
    f = MEASURES[measure]
    return min(f(a, p) for a, p, _ in ANSWERS), max(f(a, d) for a, _, d in ANSWERS)


def test_text_score_separates_every_paraphrase_from_every_different_answer() -> None:
    """Word trigrams rank each paraphrase above each different answer with a margin; a character edit ratio
    does not separate them at all (its best different answer beats its worst paraphrase)."""
    for measure in MEASURES:
        low, high = separation(measure)
        print(f"{measure:28s} lowest paraphrase {low:.2f}  highest different answer {high:.2f}  gap {low - high:+.2f}")
    low, high = separation("word trigram dice (score)")
    assert low - high > 0.15
    assert max(separation(m)[0] - separation(m)[1] for m in MEASURES if "score" not in m) < low - high
    low, high = separation("character ratio")
    assert low < high


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("Paris is the capital.", "Paris is the capital.", 1.0),
        ("Paris  is the\ncapital.", " Paris is the capital. ", 1.0),  # whitespace only: identical
        ("Paris is the capital.", "paris is the capital", BELOW_ONE),  # case and punctuation: not identical
        ("", "", 1.0),
        ("", "Paris is the capital.", 0.0),
        ("42", "43", 0.0),
    ],
)
def test_text_scores_at_the_edges(a: str, b: str, expected: float) -> None:
    """Identical is 1.0, a case or punctuation change just below it, empty against text 0, numbers wholly apart."""
    assert score(Output("chat", text=a), Output("chat", text=b), TOL) == expected


def test_scripts_without_spaces_still_compare() -> None:
    """Japanese has no spaces: trigrams of its characters still rank a reordering above another answer."""
    answer, reordered, other = "東京は日本の首都です。", "日本の首都は東京です。", "富士山は日本で一番高い山です。"
    assert text_score(answer, reordered) > 2 * text_score(answer, other)


def test_a_lone_surrogate_scores_without_raising() -> None:
    """JSON may escape half a surrogate pair; the text still scores."""
    assert 0.0 < text_score("caf\ud800 menu", "caf\ud800 list") < 1.0


def _chat(text: str = "", calls: tuple[tuple[str, str], ...] = (), document: object = None) -> Output:
    return Output("chat", text=text, tool_calls=calls, document=document)


PAIRS = [
    (_chat("Hello there."), _chat("Hello   there.")),
    (_chat("Hello there."), _chat("Hello there!")),
    (_chat('{"a": 1}', document={"a": 1}), _chat('{ "a" : 1.0000001 }', document={"a": 1.0000001})),
    (_chat(calls=(("f", "{}"), ("g", "{}"))), _chat(calls=(("g", "{}"), ("f", "{}")))),
    (_chat("ok", calls=(("f", "{}"),)), _chat("ok", calls=(("f", "{}"),))),
    (Output("json", document={"x": [1, 2]}), Output("json", document={"x": [1, 2, 3]})),
    (Output("json", document={"id": 1, "x": 2}), Output("json", document={"id": 2, "x": 2})),
    (Output("embedding", embeddings=((1.0, 0.0),)), Output("embedding", embeddings=((1.0, 1e-9),))),
    (Output("embedding", embeddings=((1.0, 0.0),)), Output("embedding", embeddings=((2.0, 0.0),))),
    (Output("empty"), Output("empty")),
    (Output("empty"), _chat("")),
    (Output("json", document={"label": "a", "p": 0.9}, label="a"), Output("json", document={"label": "a"}, label="a")),
]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_a_score_is_one_exactly_when_the_answers_match_exactly(a: Output, b: Output) -> None:
    """1.0 means what exact_match means, so the top bucket counts identical answers."""
    assert (score(a, b, TOL) == 1.0) == exact_match(a, b, TOL)[0]


@pytest.mark.parametrize(
    ("a", "b", "share"),
    [
        ({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 4}, 2 / 3),
        ({"a": 1, "b": 2}, {"a": 1}, 1 / 2),  # a field on one side only
        ({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"x": 1, "y": 3}, "b": 1}, 2 / 3),
        ({"a": [1, 2, 3]}, {"a": [1, 2]}, 2 / 3),  # the extra item is a leaf of the union
        ({"a": {"x": 1, "y": 2}}, {"a": 5}, 0.0),  # a container against a scalar: all three leaves differ
        ({"a": 1.0, "b": True}, {"a": 1.0004, "b": 1}, 1 / 2),  # within tolerance; a bool is not a number
        ({"id": "x", "created": 1, "v": "a"}, {"id": "y", "created": 2, "v": "b"}, 0.0),  # ignored paths
        ({"a": {}, "b": []}, {"a": {}, "b": []}, 1.0),  # empty containers are leaves
    ],
)
def test_json_scores_the_share_of_equal_leaf_fields(a: object, b: object, share: float) -> None:
    """Equal leaves within tolerance over the union of leaf paths, with json_diff's ignore paths."""
    assert document_score(a, b, TOL) == pytest.approx(share)


def test_nested_ignore_paths_follow_json_diff() -> None:
    """A dotted ignore path skips that field only; a bare name skips it at any depth."""
    tol = Tolerance(frozenset({"meta.trace", "seed"}))
    a = {"meta": {"trace": 1, "lang": "en"}, "deep": {"seed": 1}, "trace": 1}
    b = {"meta": {"trace": 2, "lang": "en"}, "deep": {"seed": 2}, "trace": 2}
    assert document_score(a, b, tol) == pytest.approx(1 / 2)


def test_a_json_mode_chat_answer_is_scored_by_its_fields() -> None:
    """Structured outputs compare field by field, whatever their formatting."""
    a = _chat('{"sentiment": "positive", "stars": 5}', document={"sentiment": "positive", "stars": 5})
    b = _chat('{"stars": 4, "sentiment": "positive"}', document={"stars": 4, "sentiment": "positive"})
    assert score(a, b, TOL) == pytest.approx(0.5)


def _vectors(*rows: tuple[float, ...]) -> Output:
    return Output("embedding", embeddings=rows)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (_vectors((1.0, 0.0)), _vectors((1.0, 0.0)), 1.0),
        (_vectors((1.0, 0.0)), _vectors((0.0, 1.0)), 0.0),
        (_vectors((1.0, 0.0)), _vectors((-1.0, 0.0)), 0.0),  # clipped at 0
        (_vectors((1.0, 0.0), (1.0, 0.0)), _vectors((1.0, 0.0), (1.0, 1.0)), 0.7071),  # the batch's lowest
        (_vectors((1.0, 0.0)), _vectors((1.0, 0.0), (1.0, 0.0)), 0.0),  # another batch size
        (_vectors((1.0, 0.0)), _vectors((1.0, 0.0, 0.0)), 0.0),  # another dimension
        (_vectors((0.0, 0.0)), _vectors((1.0, 0.0)), None),  # a zero vector has no direction
        (_vectors((1.0, 0.0)), _chat("text"), 0.0),
    ],
)
def test_embeddings_score_their_lowest_cosine(a: Output, b: Output, expected: float | None) -> None:
    """Cosine clipped to [0, 1], the lowest over a batch; None when a cosine is undefined."""
    value = score(a, b, TOL)
    assert value == (pytest.approx(expected, abs=1e-4) if expected is not None else None)


def test_labels_agree_or_not() -> None:
    """A classifier's answers score 1 or 0 on their label, whatever their confidence scores."""
    spam = parse_body((PAYLOADS / "classifier.json").read_bytes(), "application/json")
    surer = parse_body(b'{"label": "spam", "score": 0.99}', "application/json")
    ham = parse_body(b'{"label": "ham", "score": 0.9731}', "application/json")
    assert score(spam, spam, TOL) == 1.0
    assert score(spam, surer, TOL) == BELOW_ONE
    assert score(spam, ham, TOL) == 0.0


def test_tool_calls_score_the_share_of_calls_both_make() -> None:
    """Equal calls over the longer list, in any order; with text, the lower of the two scores."""
    weather, time = ("get_weather", '{"city":"Paris"}'), ("get_time", '{"tz":"CET"}')
    assert score(_chat(calls=(weather, time)), _chat(calls=(weather,)), TOL) == 0.5
    assert score(_chat(calls=(weather, time)), _chat(calls=(time, weather)), TOL) == BELOW_ONE
    assert score(_chat(calls=(weather,)), _chat(calls=(("get_weather", '{"city":"Rome"}'),)), TOL) == 0.0
    assert score(_chat("Let me check.", (weather,)), _chat("Let me check.", (time,)), TOL) == 0.0
    assert score(_chat("Let me check the weather."), _chat("", (weather,)), TOL) == 0.0
    real = parse_body((PAYLOADS / "anthropic_message_tool_use.json").read_bytes(), "application/json")
    paraphrase = Output("chat", text="Let me look up the weather in San Francisco.", tool_calls=real.tool_calls)
    assert 0.2 < score(real, paraphrase, TOL) < 1.0  # the same call: the text decides


def test_buckets_keep_identical_answers_apart() -> None:
    """200 buckets of 0.005 and one for exactly 1.0; a bucket stands for its midpoint."""
    assert BUCKETS == 201 and IDENTICAL == 200
    assert [bucket(v) for v in (0.0, 0.004, 0.005, 0.5, 0.9999, BELOW_ONE, 1.0)] == [0, 0, 1, 100, 199, 199, 200]
    assert bucket(-0.1) == 0 and bucket(1.5) == 200
    assert bucket_value(0) == 0.0025 and bucket_value(IDENTICAL) == 1.0


def microseconds_per_score() -> dict[str, float]:
    """Best-of-five µs per score for a 2 KB chat pair and a small JSON pair (a bench can reuse this)."""
    sentence = "The order ships within two business days and the tracking link arrives by email. "
    a = Output("chat", text=(sentence * 30)[:2000])
    b = Output("chat", text=(sentence.replace("two", "three").replace("email", "text message") * 30)[:2000])
    document = {"id": "x", "label": "positive", "score": 0.93, "scores": [{"label": "negative", "score": 0.07}]}
    x = Output("json", document=document | {"meta": {"lang": "en", "tags": ["a", "b"]}})
    y = Output("json", document=document | {"score": 0.91, "meta": {"lang": "en", "tags": ["a", "c"]}})
    return {
        name: min(timeit.repeat(functools.partial(score, *pair, TOL), number=200, repeat=5)) / 200 * 1e6
        for name, pair in (("chat_2kb", (a, b)), ("small_json", (x, y)))
    }


def test_scoring_fits_the_comparators_budget() -> None:
    """A small JSON pair scores in well under the 200 µs a pair may take at 5,000 pairs/s."""
    timings = microseconds_per_score()
    print({name: round(us, 1) for name, us in timings.items()})
    assert timings["small_json"] < 100

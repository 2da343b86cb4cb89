"""How similar two answers are, as one score in [0, 1] by output type, and the bucket it is counted in.

The score is what the divergence gate (``divergence.py``) compares between candidate-vs-incumbent pairs and
incumbent-vs-incumbent (A/A) pairs, so it must separate a paraphrase (two samples of one model at temperature
> 0) from a materially different answer, and cost little: the comparator scores every pair.

- text (chat, completions, Responses, Anthropic, TGI, Ollama, any text): Sørensen-Dice over the multisets of
  character trigrams of the answer's words (lowercased, punctuation and symbols dropped, words joined by one
  space and padded), i.e. chrF with n = 3 and beta = 1. Trigrams credit shared words and shared stems
  ("cancel" / "cancelled"), need no word list or language, and work on scripts written without spaces.
  ``docs/divergence.md`` has the measurements behind the choice (``tests/test_similarity.py`` pins them).
- JSON documents (JSON answers, JSON-mode chat answers): the share of leaf fields equal within tolerance, over
  the union of both documents' leaf paths, with ``json_diff``'s ignore paths and numeric rules.
- embeddings: cosine clipped to [0, 1], the lowest over the vectors of a batch.
- labels (classifier answers): 1 when they agree, else 0.
- tool calls: the calls both answers make (name and canonical arguments, as a multiset) over the longer list;
  an answer with text and tool calls scores the lower of its text (or document) score and its tool score,
  because a paraphrase that calls another tool, or the same call with other text, is a different answer.

Invariant: a score is exactly 1.0 if and only if the two answers are the same by ``metrics.exact_match``'s
rules (normalised text, JSON within tolerance, same tool calls in order, vectors within tolerance); every
other score is below 1.0 (at most the float just below it), so the histogram's top bucket counts identical
answers and a deterministic incumbent's gate is the exact-match rate test. ``None`` means the measure is
undefined for the pair (an embedding with a zero or empty vector).
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .measures import Tolerance, normalise_text, numbers_close
from .shapes import Output, ToolCalls

BUCKETS = 201  # 0..199: [i/200, (i+1)/200); 200: exactly 1.0 (identical answers)
IDENTICAL = BUCKETS - 1
WIDTH = 1.0 / IDENTICAL
BELOW_ONE = math.nextafter(1.0, 0.0)  # the highest score of two answers that are not identical


def bucket(value: float) -> int:
    """The histogram bucket of a score: 200 buckets of 0.005, and 1.0 (identical) alone in the last."""
    if value >= 1.0:
        return IDENTICAL
    return min(IDENTICAL - 1, max(0, int(value * IDENTICAL)))


def bucket_value(index: int) -> float:
    """The score a bucket stands for in statistics: its midpoint, or exactly 1.0 for the identical bucket."""
    return 1.0 if index >= IDENTICAL else (index + 0.5) * WIDTH


def score(a: Output, b: Output, tol: Tolerance) -> float | None:
    """Similarity in [0, 1] of two answers that both arrived whole and clean: 1.0 exactly when they are the same
    answer, None when the measure is undefined for them (an embedding without direction)."""
    if a.kind == "embedding" or b.kind == "embedding":
        return _embeddings(a.embeddings, b.embeddings, tol) if a.kind == b.kind else 0.0
    if a.label is not None or b.label is not None:
        body = _label(a, b, tol)
    elif a.document is not None and b.document is not None:
        body = document_score(a.document, b.document, tol)
    elif a.text is not None or b.text is not None:
        body = _text(a, b)
    else:
        body = 1.0 if a.kind == b.kind else 0.0  # both empty (or a JSON null)
    if a.tool_calls or b.tool_calls:
        return min(body, tool_score(a.tool_calls, b.tool_calls))
    return body


def _text(a: Output, b: Output) -> float:
    text_a, text_b = a.text or "", b.text or ""
    same_kind = a.kind == b.kind
    if same_kind and text_a == text_b:
        return 1.0
    value = text_score(text_a, text_b)
    if value < 1.0:  # equal trigrams are necessary for equal normalised texts: most pairs stop here
        return value
    return 1.0 if same_kind and normalise_text(text_a) == normalise_text(text_b) else BELOW_ONE


def _label(a: Output, b: Output, tol: Tolerance) -> float:
    """Agreement of two labels; equal labels score 1.0 only when the rest of the answer is equal too."""
    if a.label != b.label:
        return 0.0
    if a.document is not None and b.document is not None and document_score(a.document, b.document, tol) == 1.0:
        return 1.0
    return BELOW_ONE


# Punctuation, symbols, separators and control characters become spaces (the BMP and the emoji blocks).
_SPACES = range(0x10000), range(0x1F000, 0x1FB00)
_DROP = {c: " " for r in _SPACES for c in r if unicodedata.category(chr(c))[0] in "PSZC"} | {ord("_"): " "}


def _trigrams(text: str) -> npt.NDArray[np.int64]:
    """The sorted character trigrams of each word padded with a space, packed in int64s (3 x 21-bit code points)."""
    padded = f" {text.lower().translate(_DROP)} "
    codes = np.frombuffer(padded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    middle = codes[1:-1]
    # A trigram centred on a space spans two words ("t w") or none: dropped, so word order and spacing do not count.
    return np.sort(((codes[:-2] << 42) | (middle << 21) | codes[2:])[middle != 32])


def text_score(a: str, b: str) -> float:
    """Sørensen-Dice of the character-trigram multisets of two texts' words (chrF-3, F1); 1.0 when both have none."""
    x, y = _trigrams(a), _trigrams(b)
    if not len(x) or not len(y):
        return 1.0 if len(x) == len(y) else 0.0
    starts = np.flatnonzero(np.diff(x, prepend=x[0] - 1))  # x is sorted: where each distinct trigram starts
    counts = np.diff(starts, append=len(x))
    values = x[starts]
    in_y = np.searchsorted(y, values, "right") - np.searchsorted(y, values, "left")
    return float(2.0 * np.minimum(counts, in_y).sum() / (len(x) + len(y)))


def tool_score(a: ToolCalls, b: ToolCalls) -> float:
    """Calls made by both (name and canonical arguments, in any order) over the longer list of calls."""
    if a == b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    return min(common / max(len(a), len(b)), BELOW_ONE)


def document_score(a: Any, b: Any, tol: Tolerance) -> float:
    """Share of leaf fields equal within tolerance over the union of both documents' leaf paths.

    A leaf is a scalar or an empty container; a field on one side only, a list's extra items and a
    container against a scalar count all their leaves as unequal. Ignore paths follow ``json_diff``.
    """
    equal, total = _Leaves(tol, _dotted(tol.ignore_paths)).walk(a, b, "")
    if equal == total:
        return 1.0
    return min(equal / total, BELOW_ONE)


@functools.lru_cache(maxsize=64)
def _dotted(ignore_paths: frozenset[str]) -> bool:
    """Whether an ignore path names a nested field: only then are full paths built while walking."""
    return any("." in path for path in ignore_paths)


_MISSING = object()


class _Leaves:
    """Counts (equal leaves, leaves) of two JSON values, with ``json_diff``'s ignore and tolerance rules."""

    def __init__(self, tol: Tolerance, dotted: bool) -> None:
        self.tol, self.ignore, self.dotted = tol, tol.ignore_paths, dotted

    def walk(self, a: Any, b: Any, path: str) -> tuple[int, int]:
        if isinstance(a, dict) and isinstance(b, dict):
            return self._dicts(a, b, path)
        if isinstance(a, list) and isinstance(b, list):
            return self._lists(a, b, path)
        if a is _MISSING or b is _MISSING or isinstance(a, dict | list) or isinstance(b, dict | list):
            return 0, self.count(a, path) + self.count(b, path)
        return int(self._same(a, b)), 1

    def _dicts(self, a: dict[str, Any], b: dict[str, Any], path: str) -> tuple[int, int]:
        if not a and not b:
            return 1, 1
        equal = total = 0
        for key in a.keys() | b.keys():
            child = self._child(path, key)
            if child is None:
                continue
            e, t = self.walk(a.get(key, _MISSING), b.get(key, _MISSING), child)
            equal, total = equal + e, total + t
        return equal, total

    def _lists(self, a: list[Any], b: list[Any], path: str) -> tuple[int, int]:
        if not a and not b:
            return 1, 1
        equal = total = 0
        for index in range(max(len(a), len(b))):
            child = self._child(path, str(index))
            if child is None:
                continue
            e, t = self.walk(a[index] if index < len(a) else _MISSING, b[index] if index < len(b) else _MISSING, child)
            equal, total = equal + e, total + t
        return equal, total

    def count(self, value: Any, path: str) -> int:
        """Leaves of one side's value (0 for a missing one)."""
        if value is _MISSING:
            return 0
        if isinstance(value, dict) and value:
            items: Sequence[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, list) and value:
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            return 1
        return sum(self.count(v, child) for k, v in items if (child := self._child(path, k)) is not None)

    def _child(self, path: str, key: str) -> str | None:
        """The child's path, or None when ``json_diff`` would ignore it (by full dotted path or by name)."""
        if key in self.ignore:
            return None
        if not self.dotted:
            return key  # no nested ignore path: the full path is never looked at
        child = f"{path}.{key}" if path else key
        return None if child in self.ignore else child

    def _same(self, a: Any, b: Any) -> bool:
        if isinstance(a, bool) or isinstance(b, bool):
            return a is b
        if isinstance(a, int | float) and isinstance(b, int | float):
            return numbers_close(float(a), float(b), self.tol)
        return bool(a == b)


def _embeddings(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], tol: Tolerance) -> float | None:
    """The lowest cosine over a batch's vectors, clipped to [0, 1]; 0 when the batches' shapes differ."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        return 0.0
    lowest, identical = 1.0, True
    for x, y in zip(a, b, strict=True):
        vx, vy = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        bound = np.maximum(tol.rel_tol * np.maximum(np.abs(vx), np.abs(vy)), tol.abs_tol)
        if bool(np.all(np.abs(vx - vy) <= bound)):
            continue
        identical = False
        norm = float(np.linalg.norm(vx) * np.linalg.norm(vy))
        if norm == 0.0:
            return None
        lowest = min(lowest, max(0.0, float(np.dot(vx, vy)) / norm))
    return 1.0 if identical else min(lowest, BELOW_ONE)

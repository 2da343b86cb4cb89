"""Pure pair metrics: how one answer differs from another. No I/O, no state; table-tested."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from .parse import Arm, Output, Record
from .pricing import PriceBook, Usage, count_tokens


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How JSON answers are compared: paths ignored and numeric tolerances."""

    ignore_paths: frozenset[str] = frozenset()
    abs_tol: float = 1e-6
    rel_tol: float = 1e-3


@dataclass(frozen=True, slots=True)
class PairMetrics:
    """Everything measured for one (baseline, other) pair of arms."""

    outcome_base: str | None
    outcome_other: str | None
    status_match: bool
    exact_match: bool
    field_diffs: tuple[str, ...]
    text_similarity: float | None
    token_similarity: float | None
    embedding_cosine: float | None
    label_match: bool | None
    tool_calls_match: bool | None
    latency_delta_ms: float | None
    ttfb_delta_ms: float | None
    ttft_delta_ms: float | None
    gap_delta_ms: float | None
    output_tokens_delta: int | None

    @property
    def diverged(self) -> bool:
        """Both answered cleanly and the answers differ (errors are counted separately)."""
        return self.outcome_base is None and self.outcome_other is None and not self.exact_match

    @property
    def similarity(self) -> float:
        """One number in [0, 1] for ranking divergent examples: 1 is identical."""
        for value in (self.embedding_cosine, self.text_similarity):
            if value is not None:
                return max(0.0, value)
        return 1.0 if self.exact_match else 0.0


def normalise_text(text: str) -> str:
    """Text compared for exact match: surrounding whitespace stripped, runs of whitespace collapsed."""
    # str.split() splits on exactly the characters the regex \s matches, and is several times faster.
    return " ".join(text.split())


def text_similarity(a: str, b: str) -> float:
    """Character-level similarity in [0, 1] (normalised Indel distance, via rapidfuzz)."""
    return fuzz.ratio(a, b) / 100.0


def token_similarity(a: str, b: str) -> float:
    """Word-level similarity in [0, 1]: 1 - normalised Levenshtein distance over whitespace tokens."""
    return float(Levenshtein.normalized_similarity(a.split(), b.split()))


def cosine(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cosine similarity of two vectors; None when their lengths differ or one is zero."""
    if len(a) != len(b) or not a:
        return None
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return None if norm == 0.0 else float(np.dot(va, vb) / norm)


def numbers_close(a: float, b: float, tol: Tolerance) -> bool:
    return math.isclose(a, b, rel_tol=tol.rel_tol, abs_tol=tol.abs_tol)


def json_diff(a: Any, b: Any, tol: Tolerance, path: str = "") -> Iterator[str]:
    """Paths (dotted, list indices as numbers) where two JSON values differ beyond tolerance."""
    if path and (path in tol.ignore_paths or path.rsplit(".", 1)[-1] in tol.ignore_paths):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            child = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                if not (child in tol.ignore_paths or key in tol.ignore_paths):
                    yield child
            else:
                yield from json_diff(a[key], b[key], tol, child)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path}.length" if path else "length"
        for index, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from json_diff(x, y, tol, f"{path}.{index}" if path else str(index))
    elif isinstance(a, bool) or isinstance(b, bool):
        if a is not b:
            yield path or "$"
    elif isinstance(a, int | float) and isinstance(b, int | float):
        if not numbers_close(float(a), float(b), tol):
            yield path or "$"
    elif a != b:
        yield path or "$"


def exact_match(
    a: Output, b: Output, tol: Tolerance, texts: tuple[str, str] | None = None
) -> tuple[bool, tuple[str, ...]]:
    """Whether two outputs are the same answer, and which JSON fields differ (``texts``: already normalised)."""
    norm_a, norm_b = texts or (normalise_text(a.text or ""), normalise_text(b.text or ""))
    if a.kind in ("chat", "completion") and b.kind == a.kind:
        if a.document is not None and b.document is not None:
            # JSON mode / structured outputs: the same fields within tolerance, whatever the formatting.
            diffs = tuple(json_diff(a.document, b.document, tol))[:20]
            if diffs:
                return False, diffs
        elif norm_a != norm_b:
            return False, ("text",)
        return (True, ()) if a.tool_calls == b.tool_calls else (False, ("tool_calls",))
    if a.kind == "embedding" and b.kind == "embedding":
        same = len(a.embeddings) == len(b.embeddings) and all(
            len(x) == len(y) and all(numbers_close(p, q, tol) for p, q in zip(x, y, strict=True))
            for x, y in zip(a.embeddings, b.embeddings, strict=True)
        )
        return same, () if same else ("embedding",)
    if a.document is not None and b.document is not None:
        diffs = tuple(json_diff(a.document, b.document, tol))[:20]
        return not diffs, diffs
    if a.kind == b.kind == "empty":
        return True, ()
    same = a.kind == b.kind and norm_a == norm_b
    return same, () if same else ("body",)


@dataclass(frozen=True, slots=True)
class Charge:
    """What one answer cost, where its price came from, and whether its tokens were counted by us."""

    amount: float | None
    source: str
    output_tokens: int
    estimated: bool


def arm_cost(arm: Arm, record: Record, book: PriceBook) -> Charge:
    """The cost of one arm's answer: its usage block priced by the arm's book; tokens the answer did not
    report are counted with the model's tokenizer (and the charge is marked estimated)."""
    output = arm.output
    model = output.model or arm.model or (record.model if record.model != "-" else None)
    prompt, completion = output.prompt_tokens, output.completion_tokens
    if output.kind == "embedding" and completion is None:
        completion = 0  # embeddings produce no output tokens; their usage block has none to report
    estimated = prompt is None or completion is None
    if prompt is None:
        prompt = count_tokens(model, record.prompt_text)[0]
    if completion is None:
        completion = count_tokens(model, output.text or "")[0]
    usage = Usage(int(prompt), int(completion), int(output.cached_tokens or 0), int(output.reasoning_tokens or 0))
    priced = book.price(model, usage)
    return Charge(priced.amount, priced.source, int(completion), estimated)


def _delta_int(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else int(b) - int(a)


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 3)


def compare(base: Arm, other: Arm, tol: Tolerance) -> PairMetrics:
    """Every pair metric of ``other`` measured against ``base``."""
    a, b = base.output, other.output
    texts = (normalise_text(a.text or ""), normalise_text(b.text or ""))
    same, diffs = exact_match(a, b, tol, texts)
    both_text = a.text is not None and b.text is not None and a.kind == b.kind and a.kind != "embedding"
    vectors = a.embeddings and b.embeddings and len(a.embeddings) == len(b.embeddings)
    cosines = [cosine(x, y) for x, y in zip(a.embeddings, b.embeddings, strict=True)] if vectors else []
    return PairMetrics(
        outcome_base=base.outcome,
        outcome_other=other.outcome,
        status_match=base.status == other.status,
        exact_match=same,
        field_diffs=diffs,
        text_similarity=text_similarity(*texts) if both_text else None,
        token_similarity=token_similarity(a.text or "", b.text or "") if both_text else None,
        embedding_cosine=min((c for c in cosines if c is not None), default=None) if cosines else None,
        label_match=(a.label == b.label) if a.label is not None or b.label is not None else None,
        tool_calls_match=(a.tool_calls == b.tool_calls) if a.tool_calls or b.tool_calls else None,
        latency_delta_ms=_delta(base.duration_ms, other.duration_ms),
        ttfb_delta_ms=_delta(base.ttfb_ms, other.ttfb_ms),
        ttft_delta_ms=_delta(base.ttft_ms, other.ttft_ms),
        gap_delta_ms=_delta(base.gap_p50_ms, other.gap_p50_ms),
        output_tokens_delta=_delta_int(a.completion_tokens, b.completion_tokens),
    )

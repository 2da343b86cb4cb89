"""The report as one typed structure: the single definition the controller, admin API, CLI, exposition and
dashboard (through its JSON) read. ``Report.as_json()`` is the JSON documented in ``docs/report.md``.

Frozen pydantic models with ``extra="forbid"``: a field the builder adds without adding it here is an error
at once, not a silent drift between writer and readers. Free-form parts (gate details, drift series, time
series, distributions, examples, workers) stay plain JSON values: they are shown, never decided on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

Counts = dict[str, int]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quantiles(_Model):
    n: int
    p50: float | None
    p95: float | None
    p99: float | None


class LatencyByArm(_Model):
    incumbent: Quantiles
    candidate: Quantiles


class Latency(_Model):
    total: LatencyByArm
    ttfb: LatencyByArm
    ttft: LatencyByArm


class PerArm(_Model):
    incumbent: int
    candidate: int


class ArmErrors(_Model):
    rate: float | None
    by_class: Counts


class Errors(_Model):
    incumbent: ArmErrors
    candidate: ArmErrors
    candidate_only: int
    incumbent_only: int
    both: int
    status_mismatch: int


class Cost(_Model):
    incumbent_per_1k_requests: float | None
    candidate_per_1k_requests: float | None
    ratio: float | None
    output_tokens: PerArm
    estimated_share: float | None


class Divergence(_Model):
    pairs_compared: int
    candidate_rate: float | None
    noise_pairs: int
    noise_rate: float | None
    mean_similarity: float | None
    noise_mean_similarity: float | None
    semantic_mean_similarity: float | None
    semantic_noise_mean_similarity: float | None
    semantic_pairs: int
    semantic_noise_pairs: int
    semantic_fallbacks: Counts
    unscored_pairs: int
    text_similarity_mean: float | None
    token_similarity_mean: float | None
    embedding_cosine_mean: float | None
    label_agreement: float | None
    tool_call_agreement: float | None
    truncated_pairs: int


class ArmAnswers(_Model):
    shapes: Counts
    recognised_share: float | None
    parse_errors: Counts
    price_sources: Counts


class Answers(_Model):
    incumbent: ArmAnswers
    candidate: ArmAnswers
    truncated: int
    skipped: Counts
    excluded: Counts


class JudgeCalibration(_Model):
    pairs: int
    first: int
    second: int
    ties: int
    first_share: float | None


class Judge(_Model):
    judged_pairs: int
    wins: int
    losses: int
    ties: int
    win_rate: float | None
    win_rate_interval: list[float] | None
    calibration: JudgeCalibration
    position_bias: float | None
    skipped: Counts
    cost: float


class ArmSatisfaction(_Model):
    feedback: int
    scored: int
    mean_score: float | None
    interval: list[float] | None
    labels: Counts


class Satisfaction(_Model):
    incumbent: ArmSatisfaction
    candidate: ArmSatisfaction


class Summary(_Model):
    records: int
    pairs: int
    unpaired: int
    latency_ms: Latency
    latency_censored: PerArm
    errors: Errors
    cost: Cost
    divergence: Divergence
    answers: Answers
    judge: Judge
    satisfaction: Satisfaction | None = None  # the range's summary has it; segments' do not


class GateResult(_Model):
    """One gate as reported: outcome, the evidence for it, and the method (single look or sequence)."""

    name: str
    outcome: str
    statistic: str
    estimate: float | None
    interval: tuple[float | None, float | None] | None  # an unbounded side is null in JSON
    n: int
    threshold: float | None
    unit: str
    rule: str
    p_value: float | None
    need_more_pairs: int | None
    details: dict[str, Any]
    examples: list[str]
    method: str


class Verdict(_Model):
    outcome: str
    gates: list[GateResult]

    def gate(self, name: str) -> GateResult | None:
        return next((g for g in self.gates if g.name == name), None)


class CandidateBrief(_Model):
    name: str
    records: int
    pairs: int
    verdict: str
    gates: dict[str, str]


class Range(_Model):
    since: float
    until: float
    windows: int


class SegmentReport(_Model):
    id: str
    segment: dict[str, Any]
    summary: Summary
    verdict: str
    gates: list[GateResult]


class Report(_Model):
    version: int
    candidate: str
    candidates: list[CandidateBrief]
    generated_at: float
    range: Range
    summary: Summary
    verdict: Verdict
    segments: list[SegmentReport]
    drift: list[dict[str, Any]]
    timeseries: list[dict[str, Any]]
    distributions: dict[str, Any]
    examples: list[dict[str, Any]]
    notes: list[str]
    workers: list[dict[str, Any]] = []
    pending: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The documented JSON (docs/report.md)."""
        return self.model_dump(mode="json")

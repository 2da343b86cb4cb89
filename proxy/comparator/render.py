"""The terminal rendering of a report (rich tables); the JSON form is the report itself."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .report_model import GateResult, Report, Summary

_STYLE = {"pass": "green", "fail": "bold red", "inconclusive": "yellow", "skipped": "dim"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def render(report: Report, console: Console) -> None:
    """Print the summary, latency, errors, cost, divergence, verdicts, drift flags and examples."""
    s = report.summary
    verdict = report.verdict.outcome
    console.print(
        f"[bold]shadow-proxy report[/bold], candidate [bold]{report.candidate}[/bold] vs incumbent: "
        f"{s.pairs} pairs ({s.records} records) in "
        f"{report.range.windows} windows - verdict [{_STYLE[verdict]}]{verdict.upper()}[/]"
    )
    if len(report.candidates) > 1:
        others = Table(title="Candidates (each against the incumbent on the same requests; --candidate NAME)")
        for column in ("candidate", "pairs", "verdict", "gates"):
            others.add_column(column)
        for item in report.candidates:
            outcomes = ", ".join(f"{name} {outcome}" for name, outcome in item.gates.items())
            others.add_row(item.name, str(item.pairs), f"[{_STYLE[item.verdict]}]{item.verdict}[/]", outcomes)
        console.print(others)
    latency = Table(title="Latency (ms)")
    for column in ("metric", "arm", "p50", "p95", "p99", "n"):
        latency.add_column(column, justify="right" if column not in ("metric", "arm") else "left")
    for metric, arms in (("total", s.latency_ms.total), ("ttfb", s.latency_ms.ttfb), ("ttft", s.latency_ms.ttft)):
        for arm, q in (("incumbent", arms.incumbent), ("candidate", arms.candidate)):
            latency.add_row(metric, arm, _ms(q.p50), _ms(q.p95), _ms(q.p99), str(q.n))
    console.print(latency)
    console.print(_facts(s))
    if console.width < WIDE:
        _gates_as_lines(report.verdict.gates, console)
    else:
        _gates_as_table(report.verdict.gates, console)
    _segments_drift_examples(report, console)


def _facts(s: Summary) -> Table:
    e, c, d = s.errors, s.cost, s.divergence
    facts = Table(title="Errors, cost, divergence", show_header=False)
    facts.add_column("what")
    facts.add_column("incumbent", justify="right")
    facts.add_column("candidate", justify="right")
    facts.add_row("error rate", _pct(e.incumbent.rate), _pct(e.candidate.rate))
    facts.add_row("errors by class", str(e.incumbent.by_class or "-"), str(e.candidate.by_class or "-"))
    per_1k = (c.incumbent_per_1k_requests, c.candidate_per_1k_requests)
    facts.add_row("cost per 1k requests", *("-" if v is None else f"${v:.4f}" for v in per_1k))
    facts.add_row("divergence (A/A noise vs candidate)", _pct(d.noise_rate), _pct(d.candidate_rate))
    facts.add_row("mean similarity", _score(d.noise_mean_similarity), _score(d.mean_similarity))
    if d.semantic_pairs:
        facts.add_row(
            "semantic similarity", _score(d.semantic_noise_mean_similarity), _score(d.semantic_mean_similarity)
        )
    judge = s.judge
    if judge.judged_pairs:
        facts.add_row(
            "judge: A/A first-shown share vs candidate win rate",
            _pct(judge.calibration.first_share),
            f"{_pct(judge.win_rate)} of {judge.wins + judge.losses}",
        )
    return facts


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


WIDE = 120  # below this a table squeezes the rule to nothing: one gate per line, its rule beneath


def _bound(value: float | None) -> str:
    return "inf" if value is None else f"{value:.4g}"  # an unbounded side


def _figures(g: GateResult) -> tuple[str, str, str]:
    interval = "-" if not g.interval else f"[{_bound(g.interval[0])}, {_bound(g.interval[1])}]"
    estimate = "-" if g.estimate is None else f"{g.estimate:.4g} {g.unit}"
    threshold = "-" if g.threshold is None else f"{g.threshold:.4g}"
    return estimate, interval, threshold


def _rule(g: GateResult) -> str:
    # Rules name config tables ("[incumbent.price]"): escaped, or rich would read them as markup.
    return escape(g.rule + (f"; need about {g.need_more_pairs} more pairs" if g.need_more_pairs else ""))


def _gates_as_lines(gates: list[GateResult], console: Console) -> None:
    console.print("[bold]Verdicts[/bold]")
    for g in gates:
        estimate, interval, threshold = _figures(g)
        console.print(
            f"  {g.name:<13} [{_STYLE[g.outcome]}]{g.outcome.upper():<12}[/] {estimate} {interval}"
            f" vs {threshold}, n={g.n}",
            overflow="fold",
        )
        console.print(f"      {_rule(g)}", overflow="fold", style="dim")


def _gates_as_table(gates: list[GateResult], console: Console) -> None:
    table = Table(title="Verdicts")
    for column in ("gate", "outcome", "estimate", "interval", "threshold", "n"):
        table.add_column(column, no_wrap=True)
    table.add_column("rule", ratio=1)
    for g in gates:
        estimate, interval, threshold = _figures(g)
        outcome = f"[{_STYLE[g.outcome]}]{g.outcome}[/]"
        table.add_row(g.name, outcome, estimate, interval, threshold, str(g.n), _rule(g))
    console.print(table)


def _segments_drift_examples(report: Report, console: Console) -> None:
    for segment in report.segments:
        seg = segment.segment
        console.print(
            f"  segment {seg.get('route')} model={seg.get('model')} stream={seg.get('streaming')}: "
            f"{segment.summary.pairs} pairs, [{_STYLE[segment.verdict]}]{segment.verdict}[/]"
        )
    # Drift, time series and examples are free-form JSON in the report (shown, never decided on).
    for item in report.drift:
        if item["drift"]:
            console.print(f"  [yellow]drift[/yellow] {item['metric']}: {item['first']} -> {item['last']}")
    for example in report.examples[:3]:
        console.print(
            f"  example {example['request_id']} similarity={example['metrics']['similarity']}: "
            f"incumbent={escape(str(example['incumbent']['output'])[:60])!r} "
            f"candidate={escape(str(example['candidate']['output'])[:60])!r}"
        )

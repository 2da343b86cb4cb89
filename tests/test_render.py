"""The terminal report stays readable where it is read: 80 columns, piped into a log."""

from __future__ import annotations

import io

from rich.console import Console

from proxy.comparator.render import render
from proxy.comparator.report import build
from proxy.config import CompareConfig


def _rendered(width: int) -> str:
    report = build([], {}, CompareConfig(), since=0.0, until=60.0)
    out = io.StringIO()
    render(report, Console(file=out, width=width, color_system=None))
    return out.getvalue()


def test_at_80_columns_every_gate_name_outcome_and_rule_is_whole() -> None:
    """No gate name, outcome or rule is cut with an ellipsis at 80 columns."""
    text = _rendered(80)
    report = build([], {}, CompareConfig(), since=0.0, until=60.0).as_json()
    for gate in report["verdict"]["gates"]:
        assert gate["name"] in text and gate["outcome"].upper() in text
        words = gate["rule"].split()
        assert " ".join(words[:4]) in " ".join(text.split())  # folded lines, not truncated
    assert "…" not in text
    assert "[incumbent.price]" in text  # rule text is shown as written, not read as markup
    assert max(len(line) for line in text.splitlines()) <= 80


def test_wide_terminals_keep_the_table() -> None:
    """With room for it the verdicts are one table, its header naming every column on one line."""
    lines = _rendered(160).splitlines()
    assert any(all(column in line for column in ("gate", "outcome", "interval", "threshold", "rule")) for line in lines)

"""`shadow-proxy demo` runs the whole loop on its own and prints a report."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_end_to_end_and_prints_the_report() -> None:
    """Embedded Redis, sample models, proxy, comparator and traffic: the report and dashboard URL appear."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--exit", "--requests", "150", "--rate", "150"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ.get("PATH", ""), "COLUMNS": "160", "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert result.returncode == 0, result.stderr
    assert "150 pairs" in result.stdout
    for gate in ("latency_p50", "error_rate", "divergence", "cost"):
        assert gate in result.stdout
    assert "dashboard: http://127.0.0.1:" in result.stdout

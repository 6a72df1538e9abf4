"""Smoke test of `ecoserve bench coordinator` on a small load (not a timed test)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ecoserve.bench.coordinator import add_arguments, run_coordinator_benchmark


@pytest.mark.slow
def test_coordinator_benchmark_writes_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "coord.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--num-requests", "40", "--max-tokens", "64", "--out", str(out)])
    assert run_coordinator_benchmark(args) == 0
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    assert summary["finished"] == 40 and summary["failed"] == 0
    assert 0 < summary["dispatch_p50_ms"] <= summary["dispatch_p99_ms"]
    assert 0 < summary["schedule_call_p50_us"] <= summary["schedule_call_p99_us"]
    assert 1 <= summary["peak_in_flight"] <= 40
    assert doc["stats_final"]["kv_used_blocks"] == 0
    assert "Coordinator cost" in capsys.readouterr().out

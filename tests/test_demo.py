"""`ecoserve demo` (the README's main job) end to end, on a shortened slice: a real cluster
of SmolLM2-135M, a streamed chat answer, the trace replay and the final table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_streams_an_answer_replays_the_trace_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ecoserve.cli", "demo", "--num-requests", "4", "--arrive-within", "4",
         "--max-prompt-len", "128", "--max-output-len", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "assistant: " in text and "Paris" in text, text[:2000]
    for line in ("Successful requests:", "P99 TTFT (ms):", "P90 TPOT (ms):", "P50 E2E (ms):", "SLO attainment:",
                 "Request throughput (req/s):", "KV used, mean / peak", "Preemptions:"):
        assert line in text, f"{line!r} missing from the table"
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    assert summary["completed"] == 4 and summary["lost"] == 0 and summary["failed"] == 0

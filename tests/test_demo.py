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
    assert "GPUs needed, simulated: opt-13b, sharegpt" in text and "distserve" in text.split("GPUs needed")[1]
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    assert summary["completed"] == 4 and summary["lost"] == 0 and summary["failed"] == 0


def test_the_headline_names_both_policies_at_each_rate_and_refuses_bad_rates() -> None:
    from ecoserve.demo.headline import head_to_head, render

    result = head_to_head((2.0,), num_requests=60, min_duration_s=5.0, max_gpus=4)
    assert [(r["rate"], r["policy"]) for r in result["rows"]] == [(2.0, "ecoserve"), (2.0, "distserve")]
    assert all(r["gpus"] is not None and r["gpus"] >= 1 for r in result["rows"])
    text = render(result)
    assert "TTFT <= 250 ms, TPOT <= 100 ms" in text and text.count("2.00") == 2
    with pytest.raises(ValueError, match="target rates > 0"):
        head_to_head((0.0,))


def test_bad_headline_rates_are_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    from ecoserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--headline-rates", "4,x"])
    assert exc.value.code == 2
    assert "give target rates > 0 in requests/s" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["1,1", "0,0,0", "1,-1,0", "a,b,c"])
def test_a_bad_demo_layout_is_one_line(layout: str, capsys) -> None:  # type: ignore[no-untyped-def]
    from ecoserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--layout", layout])
    assert exc.value.code == 2
    assert "give prefill,decode,mixed worker counts >= 0, not all 0" in capsys.readouterr().err

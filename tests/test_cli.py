"""The `ecoserve` command as a user runs it (subprocesses, real models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecoserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ECOSERVE_NUM_THREADS": "2"},
    )


@pytest.mark.slow
def test_generate_names_paris() -> None:
    proc = run_cli("generate", "--model", "smollm2-135m", "--prompt", "The capital of France is", "--max-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_unknown_model_lists_what_is_accepted() -> None:
    proc = run_cli("model", "prepare", "no-such-model")
    assert proc.returncode == 2
    for accepted in ("tiny-llama", "smollm2-135m", "Hugging Face folder"):
        assert accepted in proc.stderr


def test_bad_sampling_argument_is_a_clear_error() -> None:
    proc = run_cli("generate", "--model", "tiny-llama", "--prompt", "hi", "--top-p", "2")
    assert proc.returncode == 2
    assert "top_p must be in (0, 1]" in proc.stderr


def test_bench_engine_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench", "engine", "--model", "tiny-llama", "--num-requests", "6", "--batch-size", "3",
        "--max-output-len", "8", "--max-prompt-len", "64", "--out", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    for key in ("ecoserve_output_tok_s", "transformers_output_tok_s", "ratio", "decode_step_ms_batch1", "bandwidth_floor_ms", "floor_fraction"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    assert summary["ratio"] == pytest.approx(summary["ecoserve_output_tok_s"] / summary["transformers_output_tok_s"])
    assert len(doc["workload"]["output_lens"]) == 6 and max(doc["workload"]["output_lens"]) <= 8
    assert "ratio vs transformers" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--policy-option", "buckets=[64,32]"), "bucket bounds must be strictly increasing, got [64, 32]"),
        (("--policy-option", "margin=1"), "margin must be in [0, 1), got 1"),
        (("--predictor", "psychic"), "unknown predictor 'psychic'; choose one of ['fixed', 'histogram', 'learned', 'oracle', 'oracle-noisy']"),
        (("--policy-option", "pipelinin=false"), "unknown ecoserve option(s) ['pipelinin']"),
        (("--prefill", "0", "--decode", "0", "--mixed", "1"),
         "--policy ecoserve runs the slo schedule on mixed workers, which needs --latency-profile NAME|FILE"),
        (("--mixed", "1", "--latency-profile", "nonexistent"), "unknown latency profile 'nonexistent'"),
    ],
    ids=["buckets", "margin", "predictor", "option", "mixed-without-a-profile", "unknown-profile"],
)
def test_bad_ecoserve_configuration_is_refused_at_start(args: tuple[str, ...], message: str) -> None:
    """Checked before any worker starts: exit status 2 and a message naming what is allowed."""
    proc = run_cli("serve", "--model", "tiny-llama", "--policy", "ecoserve", "--port", "0", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr

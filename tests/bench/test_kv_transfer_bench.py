"""Smoke test of `ecoserve bench kv-transfer` with tiny settings (not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecoserve.bench.kv_transfer import run_kv_transfer_benchmark
from ecoserve.cli import build_parser


@pytest.mark.slow
def test_benchmark_writes_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kv.json"
    args = build_parser().parse_args(
        ["bench", "kv-transfer", "--prompt-lens", "32", "40", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    )
    assert run_kv_transfer_benchmark(args) == 0
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    for length in (32, 40):
        for key in ("ratio", "ratio_fragmented", "paged_gbs", "fragmented_gbs", "bare_gbs", "paged_ms", "bare_ms", "bytes"):
            value = summary[f"{key}_{length}"]
            assert isinstance(value, (int, float)) and value > 0, f"{key}_{length}"
    # 40 tokens move 3 whole blocks of 16: 30 layers * K,V * 48 tokens * 3 heads * 64 * 4 bytes
    assert summary["bytes_40"] == 30 * 2 * 48 * 3 * 64 * 4
    assert summary["ratio_32"] == pytest.approx(summary["paged_gbs_32"] / summary["bare_gbs_32"])
    assert doc["settings"]["group_blocks"] == 256 and doc["settings"]["prompt_lens"] == [32, 40]
    assert "cpu" in doc["machine"]
    assert len(doc["results"]["32"]["rank0"]["pool_s"]) == len(doc["results"]["32"]["rank0"]["fragmented_s"]) == 2
    assert "KV transfer, 2 gloo ranks" in capsys.readouterr().out

"""`ecoserve bench serve` against a real local cluster (tiny-llama, 1 prefill + 1 decode), and
its one-line errors for bad input. One cluster serves the whole module (about 10 s to start)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecoserve.local_cluster import local_cluster
from ecoserve.bench.serve.run import fetch_server_info, run_benchmark
from ecoserve.bench.serve.metrics import summarize
from ecoserve.cli import main
from ecoserve.client.types import SLO
from ecoserve.data.workload import WorkloadRequest

NUM_BLOCKS = 512  # per worker: small enough that the KV timeline shows use


@pytest.fixture(scope="module")
def addr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("serve-bench")
    extra = ("--threads-per-worker", "1", "--num-blocks", str(NUM_BLOCKS))
    with local_cluster("tiny-llama", 1, 1, 0, *extra, log_dir=logs) as address:
        yield address


def bench(addr: str, *args: str) -> int:
    return main(["bench", "serve", "--addr", addr, "--no-progress", *args])


def test_synthetic_load_writes_every_metric_and_a_plot(addr: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "synthetic.json", tmp_path / "cdf.png"
    code = bench(
        # All ten at once with long outputs: they decode together for seconds, so the 0.5 s stats
        # samples see KV in use (a trickle of short requests could fall between samples).
        addr, "--workload", "synthetic", "--num-requests", "10", "--rate", "inf", "--prompt-mean", "48",
        "--output-mean", "256", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200", "--out", str(out), "--plot", str(png),
    )
    assert code == 0
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert (s["num_requests"], s["completed"], s["failed"], s["lost"], s["output_len_mismatches"]) == (10, 10, 0, 0, 0)
    for r in doc["requests"]:  # outputs forced to the workload's lengths (ignore_eos, max_tokens)
        assert r["status"] == "ok" and r["num_output_tokens"] == r["output_len"] and r["finish_reason"] == "length"
    for metric in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < s[f"{metric}_p50_ms"] <= s[f"{metric}_p90_ms"] <= s[f"{metric}_p99_ms"], metric
        assert s[f"{metric}_mean_ms"] > 0
    assert s["e2e_p50_ms"] >= s["ttft_p50_ms"]
    assert s["total_output_tokens"] == sum(r["output_len"] for r in doc["requests"])
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    assert 0 <= s["slo_attainment"] <= 1
    assert s["goodput_req_s"] == pytest.approx(s["slo_met"] / s["duration_s"])
    assert s["kv_samples"] >= 1 and s["kv_capacity_blocks"] == 2 * NUM_BLOCKS
    assert 0 < s["kv_used_peak"] <= 1 and s["preemptions"] == 0
    assert s["schedule_call_p50_us"] > 0 and s["dispatch_p99_ms"] > 0
    assert doc["settings"]["workload"] == "synthetic" and "cpu" in doc["machine"]
    assert doc["server"]["model_id"] == "tiny-llama" and doc["errors"] == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for section in ("Time to First Token", "Time per Output Token", "Inter-token Latency", "End-to-end Latency", "SLO attainment"):
        assert section in printed


def test_azure_replay_is_time_scaled_and_fitted_to_the_server(addr: str, tmp_path: Path) -> None:
    out = tmp_path / "azure.json"
    # The first 4 conversation requests span 4.7 s of the trace: replayed at 1/20 of it.
    code = bench(
        addr, "--workload", "azure-conv", "--num-requests", "4", "--replay-timestamps", "--time-scale", "0.05",
        "--max-output-len", "40", "--out", str(out),
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["completed"] == 4 and doc["summary"]["output_len_mismatches"] == 0
    reqs = doc["requests"]
    assert [r["prompt_len"] for r in reqs] == [374, 396, 879, 91]  # the trace's own prompt lengths
    # Replies of 44, 109, 55 and 16 tokens, capped at 40: each generated exactly its forced length.
    assert [(r["output_len"], r["num_output_tokens"]) for r in reqs] == [(40, 40), (40, 40), (40, 40), (16, 16)]
    assert doc["summary"]["clipped_outputs"] == 3
    assert reqs[1]["arrival_s"] == pytest.approx(4.314579 * 0.05)


def test_library_counts_a_request_that_never_ends_as_lost(addr: str) -> None:
    info = asyncio.run(fetch_server_info(addr))
    assert (info.model_id, info.vocab_size, info.max_model_len) == ("tiny-llama", 49152, 2048)
    assert 0 < info.max_prompt_tokens < info.max_model_len and info.max_request_tokens <= NUM_BLOCKS * 16
    requests = [WorkloadRequest(0.0, 16, 4), WorkloadRequest(0.05, 16, 1800)]
    result = asyncio.run(run_benchmark(addr, requests, SLO(ttft_ms=5000), request_timeout=0.5, progress=False))
    ok, lost = result.requests
    assert ok.status == "ok" and ok.num_output_tokens == 4
    assert lost.status == "lost" and "within 0.5 s" in (lost.error or "")
    s = summarize(result)
    assert (s["completed"], s["lost"], s["slo_met"], s["slo_attainment"]) == (1, 1, 1, 0.5)


def test_text_workload_counts_prompt_tokens_as_the_server_does(addr: str, tmp_path: Path) -> None:
    out = tmp_path / "humaneval.json"
    assert bench(addr, "--workload", "humaneval", "--num-requests", "2", "--rate", "inf", "--max-output-len", "6", "--out", str(out)) == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["completed"] == 2
    assert all(r["num_output_tokens"] == r["output_len"] <= 6 and r["prompt_len"] > 20 for r in doc["requests"])


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--workload", "chatbot"], "unknown workload 'chatbot'; allowed: azure-conv, azure-code, sharegpt, humaneval, synthetic"),
        (["--workload", "azure-code", "--trace-file", "/no/such/trace.csv"], "trace file /no/such/trace.csv does not exist"),
        (["--rate", "0"], "rate must be > 0 requests/s"),
        (["--rate", "-2"], "rate must be > 0 requests/s"),
        (["--arrival", "gamma", "--cv", "0"], "cv must be a finite number > 0"),
        (["--num-requests", "0"], "num-requests must be an integer >= 1"),
        (["--workload", "synthetic", "--replay-timestamps"], "only azure-conv and azure-code have timestamps"),
        (["--plot", "cdf.svg"], "--plot writes a PNG"),
        (["--connect-timeout", "0.5"], "could not reach the EcoServe server at tcp://127.0.0.1:"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--addr", free_address(), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ecoserve: error: ") and expected in err, err

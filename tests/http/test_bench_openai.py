"""`ecoserve bench serve --backend openai` against the sim cluster's own OpenAI API: the same
workload as the ZeroMQ backend gives the same table sections and JSON fields, every output of
its forced length; and the backend options are refused where they do not belong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecoserve.cli import main
from tests.http.conftest import API_KEY, Server

pytestmark = pytest.mark.timeout(300)

WORKLOAD = ("--workload", "synthetic", "--num-requests", "4", "--rate", "inf", "--prompt-mean", "24",
            "--output-mean", "8", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "500", "--no-progress")


def test_openai_backend_gives_the_zmq_backends_fields(sim_server: Server, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    zmq_out, http_out, png = tmp_path / "zmq.json", tmp_path / "openai.json", tmp_path / "cdf.png"
    assert main(["bench", "serve", "--addr", sim_server.address, *WORKLOAD, "--out", str(zmq_out)]) == 0
    zmq_table = capsys.readouterr().out
    code = main(["bench", "serve", "--backend", "openai", "--base-url", sim_server.base_url, "--api-key", API_KEY,
                 "--tokenizer", "tiny-llama", *WORKLOAD, "--out", str(http_out), "--plot", str(png)])
    assert code == 0
    http_table = capsys.readouterr().out
    zmq_doc, doc = json.loads(zmq_out.read_text()), json.loads(http_out.read_text())
    assert set(doc) == set(zmq_doc) and set(doc["summary"]) == set(zmq_doc["summary"])
    assert set(doc["requests"][0]) == set(zmq_doc["requests"][0])
    s = doc["summary"]
    assert (s["num_requests"], s["completed"], s["failed"], s["lost"], s["output_len_mismatches"]) == (4, 4, 0, 0, 0)
    # The same seeded workload: the same prompt and output lengths, each output of its forced length.
    assert [(r["prompt_len"], r["output_len"]) for r in doc["requests"]] == \
        [(r["prompt_len"], r["output_len"]) for r in zmq_doc["requests"]]
    assert all(r["num_output_tokens"] == r["output_len"] and r["finish_reason"] == "length" for r in doc["requests"])
    for metric in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < s[f"{metric}_p50_ms"] <= s[f"{metric}_p99_ms"], metric
    assert s["slo_met"] == 4 and s["goodput_req_s"] == pytest.approx(4 / s["duration_s"])
    assert s["kv_samples"] == 0 and s["preemptions"] is None  # the server's counters are not read over HTTP
    assert doc["settings"]["backend"] == "openai" and doc["server"]["model_id"].startswith("tiny-llama")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split(":")[0] for line in http_table.splitlines() if ":" in line and not line.startswith("4 ")]
    assert rows == [line.split(":")[0] for line in zmq_table.splitlines() if ":" in line and not line.startswith("4 ")]


@pytest.mark.parametrize(("args", "expected"), [
    (["--backend", "openai"], "--backend openai needs --base-url (e.g. --base-url http://127.0.0.1:8000/v1)"),
    (["--backend", "grpc", "--addr", "tcp://127.0.0.1:1"], "unknown --backend 'grpc'; allowed: zmq, openai"),
    ([], "--backend zmq needs --addr"),
    (["--addr", "tcp://127.0.0.1:1", "--base-url", "http://x/v1"], "--base-url belongs to --backend openai, not --backend zmq"),
    (["--backend", "openai", "--base-url", "http://x/v1", "--addr", "tcp://127.0.0.1:1"],
     "--addr belongs to --backend zmq, not --backend openai"),
    (["--backend", "openai", "--base-url", "x:8000/v1"], "--base-url must be an http:// or https:// URL"),
])
def test_backend_options_are_refused_where_they_do_not_belong(args: list[str], expected: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err

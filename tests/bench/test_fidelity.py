"""`ecoserve bench sim-fidelity` end to end on tiny-llama: a quick profile fit, a real 1 prefill
+ 1 decode cluster and the simulator on the same handful of requests. Checks the JSON's shape
and that both sides saw the same requests; the 20% figure is a benchmark result, not asserted."""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest

from ecoserve.bench.fidelity.cpu_share import CPUTime
from ecoserve.bench.fidelity.run import add_arguments, calibration
from ecoserve.bench.fidelity.runs import RealRun, build_requests, calibration_requests, settings_from
from ecoserve.bench.fidelity.report import FIGURES, Batch, Latencies, back_to_back, compare, profile_cpu_s, real_batches
from ecoserve.bench.serve.metrics import RequestResult
from ecoserve.cli import main
from ecoserve.latency.profile import load_profile

NUM_REQUESTS = 5


@pytest.mark.slow  # a quick profile fit, then a two-worker cluster: about 40 s on the 2-core machine
def test_tiny_run_compares_both_sides_on_the_same_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, prof = tmp_path / "fidelity.json", tmp_path / "tiny.profile.json"
    code = main([
        "bench", "sim-fidelity", "--model", "tiny-llama", "--fit", "--quick", "--fit-out", str(prof),
        "--num-requests", str(NUM_REQUESTS), "--rate", "5", "--max-output-len", "12", "--num-blocks", "128",
        "--calibrate", "3", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Simulator fidelity" in printed and "same requests on both sides: True" in printed
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["same_requests"] is True
    assert (s["num_requests"], s["measured_completed"], s["sim_completed"]) == (NUM_REQUESTS,) * 3
    for key, _ in FIGURES:
        measured, sim = s[f"{key}_measured_ms"], s[f"{key}_sim_ms"]
        assert measured > 0 and sim > 0, key
        assert s[f"{key}_error"] == pytest.approx((sim - measured) / measured)
    assert s["max_abs_error"] == pytest.approx(max(abs(s[f"{k}_error"]) for k, _ in FIGURES))
    assert s["within_tolerance"] == (s["max_abs_error"] <= 0.2)
    assert 0 < s["cpu_share"] <= 1.01 and len(doc["cpu_shares"]) >= 1  # the probe ran during the replay
    # Calibrated on 3 other requests first: each role's CPU time over the profile's for its steps.
    assert s["calibration_prefill"] > 0 and s["calibration_decode"] > 0 and s["calibration_replay_s"] > 0
    assert set(doc["other_simulations"]) == {"uncalibrated", "cpu_share"}
    # Both sides saw each request at its arrival time with its lengths; outputs forced in full.
    rows = doc["requests"]
    assert [r["index"] for r in rows] == list(range(NUM_REQUESTS))
    for r in rows:
        m, x = r["measured"], r["simulated"]
        assert m["status"] == "ok" and m["output_tokens"] == x["output_tokens"] == r["output_len"]
        assert r["prompt_len"] <= 256 and r["output_len"] <= 12  # the quick profile's range; the clip
        assert m["ttft_ms"] > 0 and x["ttft_ms"] > 0 and m["e2e_ms"] >= m["ttft_ms"]
    # The simulator was given the cluster's settings, and the profile the fit wrote.
    st = doc["settings"]
    assert (st["profile"], st["num_blocks"], st["token_budget"], st["threads"]) == (str(prof), 128, 256, 1)
    assert json.loads(prof.read_text())["model"] == "tiny-llama"
    assert {"prefill rank 0", "decode rank 1", "coordinator"} <= set(doc["cpu"])
    assert doc["cpu"]["decode rank 1"]["run_s"] > 0 and doc["cpu"]["decode rank 1"]["sim_busy_s"] > 0
    assert set(doc["split"]) == {"measured", "simulated", "simulated_cpu_share"} and "machine" in doc


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_requests_stay_within_the_profiled_range_with_poisson_arrivals() -> None:
    s = settings_from(parse("--num-requests", "30", "--rate", "0.5", "--max-output-len", "64"))
    assert (s.max_prompt_len, s.token_budget, s.num_blocks, s.threads) == (512, 512, 1456, 1)  # the bundled profile's
    reqs = build_requests(s)
    assert len(reqs) == 30 and reqs[0].arrival_s == 0.0
    assert all(r.prompt_len <= 512 and r.output_len <= 64 for r in reqs)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
    assert all(g > 0 for g in gaps) and 0.5 < (len(gaps) / sum(gaps)) / 0.5 < 2  # about the asked rate
    assert build_requests(s) == reqs, "seeded: the same list every time"
    # The calibration replay: the 20 requests after these in the trace, on other arrival times.
    calib, both = calibration_requests(s), build_requests(s, count=50)
    assert len(calib) == s.calibrate == 20
    assert [(r.prompt_len, r.output_len) for r in calib] == [(r.prompt_len, r.output_len) for r in both[30:]]
    assert [r.arrival_s for r in calib] != [r.arrival_s for r in both[30:]]


def test_calibration_is_each_roles_cpu_time_over_the_profiles_for_its_steps() -> None:
    s = settings_from(parse())
    prof = load_profile(s.profile)
    # One prefill step of a 100-token prompt, then two decode steps of it alone.
    req = RequestResult(0, 0.0, 0.0, 100, 3, "ok", 2.0, [1.0, 1.5, 2.0])
    prefill_s = prof.prefill_ms(100, 100 * 100) / 1e3
    decode_s = (prof.decode_ms(1, 101, 101) + prof.decode_ms(1, 102, 102)) / 1e3
    cpu = {"prefill rank 0": CPUTime(2 * prefill_s, 0, 0, 0), "decode rank 1": CPUTime(0.5 * decode_s, 0, 0, 0)}
    run = RealRun(SimpleNamespace(requests=[req]), 1.0, cpu, [], [], [])
    assert calibration(s, run) == {"prefill": pytest.approx(2.0), "decode": pytest.approx(0.5)}
    assert calibration(s, None) == {}


@pytest.mark.parametrize("argv, message", [
    (("--model", "tiny-llama"), "no bundled profile for 'tiny-llama'"),
    (("--rate", "0"), "--rate must be a finite number"),
    (("--num-requests", "0"), "--num-requests must be >= 1"),
    (("--max-prompt-len", "8", "--num-requests", "5"), "have prompts <= 8 tokens"),
    (("--prefill", "2", "--calibrate", "5"), "--calibrate takes 0 or a number of requests, with --prefill 1"),
])
def test_bad_settings_are_one_line_errors(argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "sim-fidelity", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_profile_of_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_from(parse()).profile == "cpu-smollm2-135m"  # the bundled one, by name
    bundled = json.loads(resources.files("ecoserve.data").joinpath("profiles", "cpu-smollm2-135m.json").read_text())
    other = tmp_path / "p.json"
    other.write_text(json.dumps(bundled | {"model": "tiny-llama"}))
    assert main(["bench", "sim-fidelity", "--profile", str(other)]) == 2
    assert "was fitted on 'tiny-llama', not 'smollm2-135m'" in capsys.readouterr().err


def test_figures_and_errors_are_taken_alike_on_both_sides() -> None:
    real = Latencies([100.0, 200.0, 300.0], [10.0, None, 30.0], [1000.0, 2000.0, 3000.0])
    sim = Latencies([110.0, 220.0, 330.0], [9.0, None, 27.0], [1000.0, 2000.0, 3000.0])
    rows = {r.key: r for r in compare(real, sim)}
    assert rows["ttft_p50"].measured_ms == 200.0 and rows["ttft_p90"].measured_ms == pytest.approx(280.0)
    assert rows["ttft_p50"].error == pytest.approx(0.1) and rows["tpot_p50"].error == pytest.approx(-0.1)
    assert rows["jct_mean"].error == 0.0 and rows["tpot_p90"].within(0.2) and not rows["ttft_p90"].within(0.05)


def test_real_steps_are_rebuilt_from_token_times() -> None:
    # r0 (prompt 10) and r1 (prompt 50) prefill in separate steps; r0 decodes alone at 1.0 s,
    # r1 joins it at 1.1 s; both decode at 1.2 s. A step's tokens arrive within a millisecond.
    r0 = RequestResult(0, 0.0, 0.0, 10, 4, "ok", 2.0, [0.5, 1.0, 1.1, 1.2])
    r1 = RequestResult(1, 0.0, 0.0, 50, 3, "ok", 2.0, [0.9, 1.1001, 1.2001])
    prefill, decode = real_batches(SimpleNamespace(requests=[r0, r1]), gap_s=0.02)
    assert prefill == [Batch(1, 10, 100, 10), Batch(1, 50, 2500, 50)]
    assert [(b.size, b.sum_len, b.max_len) for b in decode] == [(1, 11, 11), (2, 12 + 51, 51), (2, 13 + 52, 52)]
    # Each step after the first shares r0 with the one before: the worker ran them back to back.
    assert [b.wall_s for b in decode] == [None, pytest.approx(0.1), pytest.approx(0.1)]
    prof = SimpleNamespace(prefill_ms=lambda n, sq: 1.0 + n, decode_ms=lambda b, n, m: 10.0 * b)
    assert profile_cpu_s(prof, prefill, decode) == (pytest.approx(0.062), pytest.approx(0.05))
    assert back_to_back(prof, decode) == (2, pytest.approx(0.2), pytest.approx(0.04))

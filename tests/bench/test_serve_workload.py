"""`ecoserve bench serve`'s workloads and metrics without a server: clipping to the server's
limits, arrival processes, token-id prompts, and the SLO / goodput arithmetic."""

from __future__ import annotations

import pytest

from ecoserve.bench.serve.run import _add_tokens
from ecoserve.bench.serve.metrics import BenchResult, RequestResult, summarize
from ecoserve.bench.serve.report import report_lines
from ecoserve.bench.serve.workload import (
    FIRST_PLAIN_ID, ArrivalSpec, WorkloadSpec, build_workload, prompt_token_ids, prompts_for,
)
from ecoserve.client.types import SLO, ServerInfo
from ecoserve.data.azure import load_azure_trace

SERVER = ServerInfo("ecoserve", "tiny-llama", 49152, 2048, 2047, 2048)


def test_trace_prompts_and_outputs_are_clipped_to_the_server_and_counted() -> None:
    small = ServerInfo("ecoserve", "m", 49152, 1024, 600, 800)  # a KV pool of 800 tokens per request
    w = build_workload(WorkloadSpec("azure-conv", 50, ArrivalSpec(rate=2.0)), small)
    trace = load_azure_trace("conv", 50)
    assert len(w.requests) == 50 and w.dropped == 0
    assert w.clipped_prompts == sum(r.prompt_len > 600 for r in trace) > 0
    assert all(r.prompt_len <= 600 and r.total_len <= 800 for r in w.requests)
    assert w.clipped_outputs == sum(min(t.prompt_len, 600) + t.output_len > 800 for t in trace)


def test_replay_scales_the_trace_clock_and_a_rate_replaces_it() -> None:
    trace = load_azure_trace("code", 20)
    replay = build_workload(WorkloadSpec("azure-code", 20, ArrivalSpec(replay=True, time_scale=0.5)), SERVER)
    assert [r.arrival_s for r in replay.requests] == pytest.approx([t.arrival_s * 0.5 for t in trace])
    paced = build_workload(WorkloadSpec("azure-code", 20, ArrivalSpec(rate=1000.0, arrival="gamma", cv=2.0)), SERVER)
    assert paced.requests[0].arrival_s == 0 and paced.requests[-1].arrival_s < 1.0
    assert [r.prompt_len for r in paced.requests] == [min(t.prompt_len, 2047) for t in trace]


def test_max_output_len_caps_every_output() -> None:
    w = build_workload(WorkloadSpec("synthetic", 30, ArrivalSpec(rate=5.0), max_output_len=50), SERVER)
    assert max(r.output_len for r in w.requests) == 50 and w.clipped_outputs > 0


def test_token_id_prompts_are_seeded_valid_and_skip_the_special_ids() -> None:
    ids = prompt_token_ids(3, 500, 49152, seed=1)
    assert ids == prompt_token_ids(3, 500, 49152, seed=1) != prompt_token_ids(4, 500, 49152, seed=1)
    assert len(ids) == 500 and all(FIRST_PLAIN_ID <= t < 49152 for t in ids)
    assert all(0 <= t < 64 for t in prompt_token_ids(0, 100, 64))  # a tiny vocabulary still works
    w = build_workload(WorkloadSpec("synthetic", 3, ArrivalSpec(rate=1.0)), SERVER)
    assert [len(p) for p in prompts_for(w.requests, 49152)] == [r.prompt_len for r in w.requests]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: WorkloadSpec("synthetic", 5, ArrivalSpec(replay=True)), "only azure-conv and azure-code"),
        (lambda: WorkloadSpec("synthetic", 5, trace_file="x.csv"), "a trace file applies to azure-conv and azure-code"),
        (lambda: ArrivalSpec(cv=2.0), "needs --arrival gamma"),
        (lambda: ArrivalSpec(arrival="uniform"), "allowed: poisson, gamma"),
        (lambda: ArrivalSpec(replay=True, time_scale=0), "time scale must be a finite number > 0"),
        (lambda: build_workload(WorkloadSpec("azure-conv", 20_000), SERVER), "has only 19366 requests"),
        (lambda: build_workload(WorkloadSpec("sharegpt", 2), SERVER), "needs the model's tokenizer"),
    ],
)
def test_bad_workload_settings_name_the_problem(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


def test_tokens_of_one_delta_share_its_wait() -> None:
    times: list[float] = []
    _add_tokens(times, 1.0, 2)  # the first delta: both tokens arrived at once
    _add_tokens(times, 1.3, 3)
    assert times == pytest.approx([1.0, 1.0, 1.1, 1.2, 1.3])


def result(*requests: RequestResult, duration: float = 10.0) -> BenchResult:
    return BenchResult(list(requests), duration, SLO(ttft_ms=100, tpot_ms=20), SERVER, [], {"preemptions": 2.0}, {"preemptions": 5.0})


def test_attainment_counts_failures_as_misses_and_goodput_is_per_second() -> None:
    fast = RequestResult(0, 0.0, 0.0, 10, 3, "ok", 0.15, [0.05, 0.06, 0.07])  # TTFT 50 ms, TPOT 10 ms
    slow_start = RequestResult(1, 1.0, 0.0, 10, 2, "ok", 1.3, [1.2, 1.21])  # TTFT 200 ms
    slow_tokens = RequestResult(2, 2.0, 0.0, 10, 2, "ok", 2.2, [2.05, 2.1])  # TPOT 50 ms
    one_token = RequestResult(3, 3.0, 0.0, 10, 1, "ok", 3.1, [3.09])  # no TPOT: met
    failed = RequestResult(4, 4.0, 0.0, 10, 5, "failed", 4.0, [], error="boom")
    s = summarize(result(fast, slow_start, slow_tokens, one_token, failed))
    assert (s["completed"], s["failed"], s["slo_met"]) == (4, 1, 2)
    assert s["slo_attainment"] == pytest.approx(2 / 5) and s["goodput_req_s"] == pytest.approx(0.2)
    assert s["ttft_p50_ms"] == pytest.approx(70.0) and s["preemptions"] == 3.0
    assert s["itl_mean_ms"] == pytest.approx((10 + 10 + 10 + 50) / 4)
    lines = report_lines(s)
    assert any("SLO attainment" in line and "0.400" in line for line in lines)


def test_a_short_output_misses_its_slo() -> None:
    short = RequestResult(0, 0.0, 0.0, 10, 4, "ok", 0.1, [0.01, 0.02])
    assert not short.meets(SLO()) and summarize(result(short))["output_len_mismatches"] == 1

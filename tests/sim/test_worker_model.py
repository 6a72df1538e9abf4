"""What `bench sim-fidelity` needs the simulator to model like the live system: workers that
read messages only between steps, decode batches costed by their longest context ("padded"
profiles), and the coordinator's TTFT split when the clock starts at 0."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ecoserve.coordinator.policies import make_policy
from ecoserve.data.workload import WorkloadRequest
from ecoserve.latency.profile import LatencyProfile, load_profile
from ecoserve.sim.simulator import HardwareConfig, InstanceSpec, Simulator

FLAT = LatencyProfile("flat", (100.0, 0.0, 0.0), (10.0, 0.0, 0.0), (10.0, 0.0, 0.0), 64, 10_000, 1)


def _run(profile: LatencyProfile, requests: list[WorkloadRequest], **hw: object) -> list:  # type: ignore[type-arg]
    config = HardwareConfig(link_bytes_per_s=1e18, link_latency_s=1e-3, kv_bytes_per_token=1, **hw)  # type: ignore[arg-type]
    sim = Simulator(make_policy("distserve"), [InstanceSpec("prefill", profile), InstanceSpec("decode", profile)], config)
    res = sim.run(requests)
    sim.assert_no_leaks()
    return res.requests


@pytest.mark.parametrize("between_steps, transfer_ms", [(False, 1.0), (True, 101.0)])
def test_a_busy_prefill_worker_reads_its_send_order_after_its_step(between_steps: bool, transfer_ms: float) -> None:
    # 1. r0 prefills alone (budget 16) from t=0 to 0.1 s; r1 (queued behind it) from 0.1 to 0.2.
    # 2. r0's SendKV comes at 0.1, while r1's step runs: a live worker reads it at 0.2.
    # 3. The transfer takes 1 ms, so r0 starts decoding at 0.101 or 0.201.
    reqs = [WorkloadRequest(0.0, 16, 3), WorkloadRequest(0.0, 16, 3)]
    r0, r1 = _run(FLAT, reqs, prefill_token_budget=16, messages_between_steps=between_steps)
    assert (r0.ttft_ms, r1.ttft_ms) == (pytest.approx(100.0), pytest.approx(200.0))
    assert r0.transfer_ms == pytest.approx(transfer_ms)
    # Arriving at t=0 is a time like any other: queued 0 ms, then prefilling for its whole TTFT.
    assert r0.queue_ms == 0.0 and r0.prefill_ms == pytest.approx(r0.ttft_ms)


def test_a_padded_profile_costs_a_decode_batch_by_its_longest_context() -> None:
    sum_form = LatencyProfile("sum", (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 1.0, 0.0), 64, 10_000, 1)
    padded = LatencyProfile("padded", (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 1.0, 0.0), 64, 10_000, 1, "padded")
    assert (sum_form.decode_ms(2, 112, 101), padded.decode_ms(2, 112, 101)) == (112.0, 202.0)
    with pytest.raises(ValueError, match="longest context"):
        padded.decode_ms(2, 112)
    # 1. r0 (10 tokens) prefills 0-1 ms, moves by 2 ms; r1 (100) prefills 1-2 ms, moves by 3 ms.
    # 2. r0 decodes alone from 2 ms (11 keys: 11 ms); r1 joins the next step, with r0:
    #    keys 12 + 101 = 113 ms by Σ, 2 · 101 = 202 ms padded; r0 ends with it.
    # 3. r1 decodes its last token alone (102 keys).
    reqs = [WorkloadRequest(0.0, 10, 3), WorkloadRequest(0.0, 100, 3)]
    by_sum, by_max = _run(sum_form, reqs), _run(padded, reqs)
    assert [r.e2e_ms for r in by_sum] == [pytest.approx(2 + 11 + 113), pytest.approx(2 + 11 + 113 + 102)]
    assert [r.e2e_ms for r in by_max] == [pytest.approx(2 + 11 + 202), pytest.approx(2 + 11 + 202 + 102)]


def test_profile_files_say_their_decode_context(tmp_path: Path) -> None:
    raw = {"prefill": [1, 2, 0], "decoding_smallbs": [1, 0.5, 2], "decoding_largebs": [1, 0.5, 2],
           "decoding_large_small_bs_threshold": 8}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    assert load_profile(str(path)).decode_context == "sum"  # DistServe's form unless said
    path.write_text(json.dumps(raw | {"decoding_context": "padded"}))
    assert load_profile(str(path)).decode_context == "padded"
    path.write_text(json.dumps(raw | {"decoding_context": "longest"}))
    with pytest.raises(ValueError, match=r"decoding_context must be one of \('sum', 'padded'\)"):
        load_profile(str(path))


QUAD = LatencyProfile("quad", (10.0, 1.0, 0.001), (10.0, 0.0, 0.0), (10.0, 0.0, 0.0), 64, 10_000, 1)


def _prefill_ms(sum_len: int, sum_sq: int) -> float:
    return QUAD.prefill_ms(sum_len, sum_sq)


@pytest.mark.parametrize("prompts, chunked, steps", [
    # Whole prompts fill the budget: 91 + 381 tokens in one step of 512.
    ((91, 381), False, [[(91, 0), (381, 0)]]),
    # 300 + 300 do not fit 512 whole: one prompt a step.
    ((300, 300), False, [[(300, 0)], [(300, 0)]]),
    # Chunked, as our engine: 300 + the first 212 of the second, then its last 88 after 212 done.
    ((300, 300), True, [[(300, 0), (212, 0)], [(88, 212)]]),
])
def test_prefill_steps_take_whole_prompts_or_chunks_up_to_the_budget(
    prompts: tuple[int, int], chunked: bool, steps: list[list[tuple[int, int]]],
) -> None:
    # A 16-token prompt at t=0 keeps the worker busy while the two others arrive at 1 ms.
    reqs = [WorkloadRequest(0.0, 16, 2), *(WorkloadRequest(0.001, n, 2) for n in prompts)]
    _, r0, r1 = _run(QUAD, reqs, prefill_token_budget=512, chunked_prefill=chunked)
    t = _prefill_ms(16, 16 * 16)
    ends = []
    for step in steps:  # a chunk of n tokens after s done ones costs n² + n·s in the Σl² term
        t += _prefill_ms(sum(n for n, _ in step), sum(n * n + n * s for n, s in step))
        ends.append(t)
    assert r0.ttft_ms == pytest.approx(ends[0] - 1.0)
    assert r1.ttft_ms == pytest.approx(ends[-1] - 1.0)


def test_mixed_ms_follows_the_profile_mixed_form() -> None:
    fused = LatencyProfile("f", (100.0, 1.0, 0.0), (10.0, 0.5, 2.0), (50.0, 0.5, 2.0), 4)
    additive = dataclasses.replace(fused, mixed_form="additive")
    assert fused.mixed_form == "fused", "DESIGN §7: one fused pass unless measured otherwise"
    # A 10-token prompt (110 ms alone) with 2 decodes over 20 keys (10 + 10 + 4 = 24 ms alone).
    assert additive.mixed_ms(10, 100, 2, 20) == 134.0
    assert fused.mixed_ms(10, 100, 2, 20) == 124.0  # the smaller fixed cost, a_d = 10, is not paid
    # At batch 4 the large-batch fit applies: its a (50) is the smaller one, not paid.
    assert fused.mixed_ms(10, 100, 4, 40) == additive.mixed_ms(10, 100, 4, 40) - 50.0
    small_prefill = dataclasses.replace(fused, prefill=(5.0, 1.0, 0.0))
    assert small_prefill.mixed_ms(10, 100, 2, 20) == 15.0 + 24.0 - 5.0  # a_p = 5 < a_d: a_d is the one paid
    for prof in (fused, additive):  # one side empty: that side's own step, in either form
        assert prof.mixed_ms(10, 100, 0, 0) == prof.prefill_ms(10, 100) == 110.0
        assert prof.mixed_ms(0, 0, 2, 20) == prof.decode_ms(2, 20) == 24.0
        assert prof.mixed_ms(0, 0, 0, 0) == 0.0


def _mixed_run(profile: LatencyProfile) -> list:  # type: ignore[type-arg]
    sim = Simulator(make_policy("vllm"), [InstanceSpec("mixed", profile)], HardwareConfig())
    res = sim.run([WorkloadRequest(0.0, 16, 3), WorkloadRequest(0.105, 16, 3)])
    sim.assert_no_leaks()
    return res.requests


def test_a_mixed_step_on_a_fused_profile_saves_the_smaller_fixed_cost() -> None:
    # 1. r0 prefills 0-100 ms (first token), decodes 100-110 ms (second).
    # 2. r1 arrived at 105 ms: the step from 110 ms prefills it and decodes r0's last token.
    #    Additive: 100 + 10 = 110 ms; fused: one pass, 100 ms (a_d = 10 < a_p = 100 not paid).
    # 3. r1 decodes its two more tokens alone, 10 ms each.
    fused = FLAT
    additive = dataclasses.replace(FLAT, mixed_form="additive")
    (f0, f1), (a0, a1) = _mixed_run(fused), _mixed_run(additive)
    assert (f0.e2e_ms, a0.e2e_ms) == (pytest.approx(210.0), pytest.approx(220.0))
    assert (f1.ttft_ms, a1.ttft_ms) == (pytest.approx(105.0), pytest.approx(115.0))
    assert a1.e2e_ms - f1.e2e_ms == pytest.approx(FLAT.decode_small[0]), "exactly one mixed step, one a_d saved"
    # A disaggregated pair never mixes: both forms give the same timings.
    reqs = [WorkloadRequest(0.0, 16, 3), WorkloadRequest(0.105, 16, 3)]
    assert [r.e2e_ms for r in _run(fused, reqs)] == [r.e2e_ms for r in _run(additive, reqs)]


def test_profile_files_say_their_mixed_form(tmp_path: Path) -> None:
    raw = {"prefill": [1, 2, 0], "decoding_smallbs": [1, 0.5, 2], "decoding_largebs": [1, 0.5, 2],
           "decoding_large_small_bs_threshold": 8}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    assert load_profile(str(path)).mixed_form == "fused"  # an older profile, nothing mixed measured
    assert load_profile("opt-13b-tp1").mixed_form == "fused"  # DistServe's fits measured no mixed steps
    path.write_text(json.dumps(raw | {"mixed_form": "additive"}))
    assert load_profile(str(path)).mixed_form == "additive"
    path.write_text(json.dumps(raw | {"mixed_form": "sum"}))
    with pytest.raises(ValueError, match=r"mixed_form must be one of \('fused', 'additive'\) or absent, got 'sum'"):
        load_profile(str(path))

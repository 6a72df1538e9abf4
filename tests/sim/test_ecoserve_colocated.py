"""EcoServe on mixed workers (DESIGN §4.1), simulated: prompts join decode iterations under the
SLO-derived budget, on mixed-only and prefill-beside-mixed layouts, and every request still ends
exactly once with nothing leaked, physical KV never exceeded and, with exact predictions and
pipelining, nothing preempted."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ecoserve.coordinator.policies import make_policy
from ecoserve.data.workload import WorkloadRequest
from ecoserve.latency.cost import CostModel
from ecoserve.latency.profile import load_profile
from ecoserve.sim.simulator import InstanceSpec, Simulator
from ecoserve.sim.worker import SimWorker

PROFILE = load_profile("opt-13b-tp1")
LAYOUTS = {
    "2 mixed": ("mixed", "mixed"),
    "1 prefill + 2 mixed": ("prefill", "mixed", "mixed"),
}


def _workload(seed: int, n: int, rate: float, max_prompt: int = 600, max_output: int = 300) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(WorkloadRequest(t, rng.randint(1, max_prompt), rng.randint(1, max_output)))
    return out


def _sim(layout: str, blocks: int | None, **opts: Any) -> Simulator:
    costs = CostModel.from_profile(PROFILE, 2 * 40 * 5120 * 2, 32e9)
    policy = make_policy("ecoserve", **{"costs": costs, **opts})
    return Simulator(policy, [InstanceSpec(role, PROFILE, num_blocks=blocks) for role in LAYOUTS[layout]])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    seed=st.integers(0, 10_000),
    rate=st.sampled_from([2.0, 20.0, 200.0]),
    blocks=st.sampled_from([60, 120, 400]),
    sigma=st.sampled_from([0.0, 0.8]),
    mode=st.sampled_from(["auto", "swap", "recompute"]),
    pipelining=st.booleans(),
)
def test_every_request_ends_once_within_physical_kv_and_nothing_leaks(
    layout: str, seed: int, rate: float, blocks: int, sigma: float, mode: str, pipelining: bool,
) -> None:
    """Tiny pools (60 blocks: under 1,000 tokens) force waiting and, with noisy predictions,
    extensions and ordered preemptions on the mixed workers themselves."""
    opts: dict[str, Any] = {"predictor": "oracle-noisy" if sigma else "oracle", "preempt_mode": mode, "margin": 0.0,
                            "pipelining": pipelining}
    if sigma:
        opts["predictor_options"] = {"sigma": sigma, "seed": seed}
    workload = _workload(seed, 60, rate)
    sim = _sim(layout, blocks, **opts)
    finish = SimWorker.finish_step

    def checked(self: SimWorker) -> None:
        finish(self)
        assert 0 <= self.free <= self.num_blocks and 0 <= self.host_free <= self.host_total, "physical KV exceeded"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SimWorker, "finish_step", checked)
        res = sim.run(workload, 1e9, 1e9)
    assert len(res.requests) == len(workload), res.counters  # one terminal event each: results are keyed by id
    assert [r.output_len for r in res.requests] == [w.output_len for w in workload]
    if not sigma and pipelining:
        # (extensions may still happen: a request reaching its exact prediction cannot be told
        # from one that goes on, so it is extended ahead; it never needs room taken from others)
        assert res.counters["preemptions"] == 0, res.counters
    sim.assert_no_leaks()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prompts_join_decode_iterations_within_the_tpot_target(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step carrying prompt tokens beside decodes is predicted within the TPOT SLO less the
    margin; decode-only steps within the SLO; and prompts do join decode iterations (counted)."""
    steps: list[tuple[int, int, float]] = []  # (decodes, prompt tokens, predicted ms)
    start = SimWorker.start

    def logged(self: SimWorker) -> float | None:
        seconds = start(self)
        if seconds is not None and self.role == "mixed":
            steps.append((self.step_batch, self.step_prompt_tokens, seconds * 1e3))
        return seconds

    monkeypatch.setattr(SimWorker, "start", logged)
    tpot, margin = 100.0, 0.1
    sim = _sim(layout, None, predictor="oracle", slo_tpot_ms=tpot, tpot_margin=margin)
    res = sim.run(_workload(7, 400, 12.0, max_prompt=1500, max_output=400), 250.0, tpot)
    assert len(res.requests) == 400
    mixed = [s for s in steps if s[0] and s[1]]
    assert mixed and res.counters["mixed_steps"] == len(mixed)
    assert max(ms for _, _, ms in mixed) <= tpot * (1 - margin) + 1e-9
    assert max(ms for n, p, ms in steps if n and not p) <= tpot + 1e-9
    sim.assert_no_leaks()


def test_the_fixed_budget_ablation_runs_the_chunked_schedule() -> None:
    assert make_policy("ecoserve").mixed_schedule == "slo"
    assert make_policy("ecoserve", slo_budget=False).mixed_schedule == "chunked"
    with pytest.raises(ValueError, match="tpot_margin must be in"):
        make_policy("ecoserve", tpot_margin=1.0)


def test_the_prompt_budget_is_the_largest_within_the_target() -> None:
    for batch, ctx in [(1, 500), (16, 8000), (64, 40000), (128, 90000)]:
        for done in (0, 700):
            n = PROFILE.prompt_budget(90.0, batch, ctx, cap=4096, done=done)
            within = PROFILE.mixed_ms(n, n * n + n * done, batch, ctx) <= 90.0 or n == 0
            over = n == 4096 or PROFILE.mixed_ms(n + 1, (n + 1) ** 2 + (n + 1) * done, batch, ctx) > 90.0
            assert within and over, (batch, ctx, done, n)
    assert PROFILE.prompt_budget(90.0, 0, 0, cap=2048) == 2048  # nothing decodes: no TPOT at stake
    assert PROFILE.prompt_budget(10.0, 200, 300_000, cap=2048) == 0  # the decodes alone are over it

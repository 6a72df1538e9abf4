"""vllm's two modes on the simulated mixed worker (DESIGN §4.2): chunked prefill under a token
budget, and prefill-priority (whole prompts first, decodes paused while prompts wait)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from ecoserve.coordinator.policies import make_policy
from ecoserve.data.workload import WorkloadRequest
from ecoserve.latency.profile import load_profile
from ecoserve.sim.simulator import InstanceSpec, SimResult, Simulator
from ecoserve.sim.worker import SimWorker

PROFILE = load_profile("opt-13b-tp1")


def make_requests(n: int = 60, rate: float = 12.0, seed: int = 4) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(WorkloadRequest(t, rng.randint(16, 900), rng.randint(2, 250)))
    return out


def run(mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple[SimResult, list[tuple[int, int, int]]]:
    """Run the workload on two mixed workers; record each step as (prompts waiting at its start,
    prompt tokens it ran, decodes it ran)."""
    steps: list[tuple[int, int, int]] = []
    start = SimWorker.start

    def spy(self: SimWorker) -> Any:
        waiting = len(self.prefill_queue)
        before = sum(len(e[0].prompt_token_ids) for e in self.prefill_queue)
        seconds = start(self)
        if seconds is not None:
            ran = before - sum(e[1] for e in self.prefill_queue)
            steps.append((waiting, ran, self.step_batch))
        return seconds

    monkeypatch.setattr(SimWorker, "start", spy)
    sim = Simulator(make_policy("vllm", mode=mode), [InstanceSpec("mixed", PROFILE, num_blocks=2000)] * 2)
    res = sim.run(make_requests(), 1e9, 1e9)
    sim.assert_no_leaks()
    return res, steps


def test_prefill_priority_never_decodes_while_prompts_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1. Prefill-priority: every step that started with prompts waiting (the pools are large,
    #    so each fits) ran prompts and no decode.
    res, steps = run("prefill-priority", monkeypatch)
    assert len(res.requests) == 60
    waited = [s for s in steps if s[0]]
    assert waited and all(ran > 0 and decodes == 0 for _, ran, decodes in waited)
    assert any(decodes for _, _, decodes in steps)  # decodes ran between the prompts
    # 2. Chunked (the default): prompts and decodes share steps.
    res_chunked, steps_chunked = run("chunked", monkeypatch)
    assert any(w and ran and decodes for w, ran, decodes in steps_chunked)
    # 3. The two schedules give different latencies on the same workload.
    ttft = [r.ttft_ms for r in res.requests]
    assert ttft != [r.ttft_ms for r in res_chunked.requests]
    assert [r.output_len for r in res.requests] == [r.output_len for r in res_chunked.requests]


def test_chunked_is_the_default() -> None:
    assert make_policy("vllm").mixed_schedule == "chunked"
    assert make_policy("vllm", mode="prefill-priority").mixed_schedule == "prefill-priority"
    assert make_policy("orca").mixed_schedule == "chunked"


def test_a_bad_mode_is_refused_naming_the_modes() -> None:
    with pytest.raises(ValueError, match="unknown vllm mode 'eager'; choose one of chunked, prefill-priority"):
        make_policy("vllm", mode="eager")
    with pytest.raises(ValueError, match="unknown option"):
        make_policy("vllm", modes="chunked")
    with pytest.raises(ValueError, match="takes no options"):
        make_policy("orca", mode="prefill-priority")

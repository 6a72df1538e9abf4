"""Simulated requests carry only what a client sends (DESIGN §7): every policy sees `max_tokens`
as the client's cap, never the trace length; only oracle predictors read a true length; orca
reserves prompt + that cap."""

from __future__ import annotations

import dataclasses
import inspect
import random
from typing import Any

import pytest

from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.policy import Policy
from ecoserve.coordinator.request import Request
from ecoserve.data.workload import WorkloadRequest
from ecoserve.latency.profile import load_profile
from ecoserve.predictor.predictors import PredictionQuery
from ecoserve.sim.lifecycle import SimLifecycle
from ecoserve.sim.simulator import InstanceSpec, Simulator
from ecoserve.sim.workloads import MAX_TOTAL_LEN

PROFILE = load_profile("opt-13b-tp1")
BLOCKS = 400  # 6,400 tokens a pool: over the context, so the cap is the context left


def make_requests(n: int = 24, seed: int = 1) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    return [WorkloadRequest(0.05 * i, rng.randint(8, 300), rng.randint(2, 200)) for i in range(n)]


def make_cluster(policy: str) -> list[InstanceSpec]:
    if policy in ("vllm", "orca"):
        return [InstanceSpec("mixed", PROFILE, num_blocks=BLOCKS)] * 2
    return [InstanceSpec("prefill", PROFILE, num_blocks=BLOCKS), InstanceSpec("decode", PROFILE, num_blocks=BLOCKS)]


def record_policy(policy: Policy) -> tuple[dict[str, int], dict[str, int]]:
    """Wrap `policy` so that it records, per request id, the `max_tokens` every call showed it
    and the blocks any reservation of its dispatches held."""
    seen: dict[str, int] = {}
    reserved: dict[str, int] = {}
    on_admit, schedule = policy.on_admit, policy.schedule

    def note(req: Request) -> None:
        assert seen.setdefault(req.request_id, req.max_tokens) == req.max_tokens

    def admit(req: Request) -> None:
        note(req)
        on_admit(req)

    def sched(state: Any) -> Any:
        for req in (*state.waiting, *state.kv_waiting, *state.requests.values()):
            note(req)
        out = schedule(state)
        for d in out.prefills:
            reserved[d.request_id] = d.reserve_blocks
        return out

    policy.on_admit = admit  # type: ignore[method-assign]
    policy.schedule = sched  # type: ignore[method-assign]
    return seen, reserved


def spy_true_lengths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the class of whoever asks the simulator's lifecycle for a true length."""
    readers: list[str] = []
    true_length = getattr(SimLifecycle, "true_length", None)

    def spy(self: SimLifecycle, request_id: str) -> int | None:
        readers.append(type(inspect.stack()[1].frame.f_locals.get("self")).__name__)
        return None if true_length is None else true_length(self, request_id)  # type: ignore[no-any-return]

    monkeypatch.setattr(SimLifecycle, "true_length", spy, raising=False)
    return readers


CASES = [
    ("ecoserve", {"predictor": "histogram"}),
    ("ecoserve", {"predictor": "fixed", "predictor_options": {"length": 64}}),
    ("ecoserve", {"predictor": "learned"}),
    ("distserve", {}),
    ("vllm", {}),
    ("orca", {}),
]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o.get('predictor', '')}".rstrip("-") for n, o in CASES])
def test_every_policy_sees_the_clients_cap_and_no_true_length(name: str, options: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # 1. A workload whose every output is shorter than the context left after its prompt.
    workload = make_requests()
    prompts = [[(7 * i + j) % 500 + 3 for j in range(w.prompt_len)] for i, w in enumerate(workload)]
    # 2. Any read of a true length is recorded with who asked.
    readers = spy_true_lengths(monkeypatch)
    # 3. Run the policy through the simulator, recording what it saw.
    policy = make_policy(name, **options)
    seen, reserved = record_policy(policy)
    sim = Simulator(policy, make_cluster(name))
    res = sim.run(workload, prompt_tokens=prompts)
    # 4. Every request ran to its trace length, and the policy saw only the client's cap.
    assert [r.output_len for r in res.requests] == [w.output_len for w in workload]
    assert seen == {f"r{i}": MAX_TOTAL_LEN - w.prompt_len for i, w in enumerate(workload)}
    assert readers == []  # no oracle here: nobody read a true length
    if name == "orca":  # orca reserves prompt + the cap, not prompt + the true length
        bs = sim.hw.block_size
        assert reserved == {f"r{i}": -(-MAX_TOTAL_LEN // bs) for i in range(len(workload))}
    sim.assert_no_leaks()


def test_only_oracle_predictors_read_true_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1. Neither a request nor a prediction query has a field a true length could sit in.
    assert "true_length" not in {f.name for f in dataclasses.fields(Request)}
    assert "true_length" not in {f.name for f in dataclasses.fields(PredictionQuery)}
    # 2. With the oracle, every read comes from the oracle predictor, one per request.
    readers = spy_true_lengths(monkeypatch)
    workload = make_requests()
    policy = make_policy("ecoserve", predictor="oracle", rl_buckets=False)
    seen, _ = record_policy(policy)
    sim = Simulator(policy, make_cluster("ecoserve"))
    res = sim.run(workload)
    assert readers == ["OraclePredictor"] * len(workload)
    # 3. It predicted each length exactly; the policy still saw only the cap.
    by_id = {f"r{i}": w for i, w in enumerate(workload)}
    assert sim.lifecycle.prediction_abs_error == 0
    assert all(seen[rid] == MAX_TOTAL_LEN - w.prompt_len for rid, w in by_id.items())
    assert len(res.requests) == len(workload)
    sim.assert_no_leaks()


def test_outputs_over_the_cap_are_clipped_and_counted() -> None:
    workload = [WorkloadRequest(0.0, 100, 50), WorkloadRequest(0.1, 100, 500), WorkloadRequest(0.2, 100, 90)]
    sim = Simulator(make_policy("distserve"), make_cluster("distserve"), max_tokens=80)
    res = sim.run(workload)
    assert [(r.output_len, r.finish_reason) for r in res.requests] == [(50, "stop"), (80, "length"), (80, "length")]
    assert res.counters["outputs_clipped"] == 2


def test_trace_caps_reproduce_every_policy_knowing_each_length() -> None:
    policy = make_policy("vllm")
    seen, _ = record_policy(policy)
    workload = make_requests(8)
    Simulator(policy, make_cluster("vllm"), max_tokens="trace").run(workload)
    assert seen == {f"r{i}": w.output_len for i, w in enumerate(workload)}


@pytest.mark.parametrize("bad", ["prompt", 0, -5, True, 2.5])
def test_a_bad_cap_is_refused_naming_the_choices(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_tokens must be one of"):
        Simulator(make_policy("distserve"), make_cluster("distserve"), max_tokens=bad)

"""`ecoserve serve`'s --latency-profile: which schedule and profile the workers get and what the
ecoserve policy's cost model reads. The policy is made to run the slo schedule on its mixed
workers here (as issue 17's policy does), so these hold whatever the policy's state."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from ecoserve.config import CoordinatorConfig, EngineConfig
from ecoserve.coordinator import policies
from ecoserve.latency.cost import CostModel


@pytest.fixture(autouse=True)
def slo_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    real = policies.make_policy

    def make(name: str, **options: Any) -> Any:
        policy = real(name, **options)
        if name == "ecoserve":
            policy.mixed_schedule = "slo"
        return policy

    monkeypatch.setattr(policies, "make_policy", make)


def configs(*argv: str) -> tuple[EngineConfig, CoordinatorConfig]:
    from ecoserve.serve import add_arguments, engine_and_coordinator

    p = argparse.ArgumentParser()
    add_arguments(p)
    return engine_and_coordinator(p.parse_args(["--policy", "ecoserve", *argv]))


def test_smollm2_on_the_cpu_defaults_to_its_bundled_fit_for_the_workers_and_the_cost_model() -> None:
    engine, coord = configs("--mixed", "2", "--model", "smollm2-135m", "--device", "cpu")
    assert (engine.scheduler.schedule, engine.scheduler.latency_profile) == ("slo", "cpu-smollm2-135m")
    costs = coord.policy_options["costs"]
    assert isinstance(costs, CostModel) and costs.has_decode_fit and costs.profile.name == "cpu-smollm2-135m"
    assert costs.kv_bytes_per_token == 46080  # the fit's own


def test_the_sim_engine_budgets_by_the_profile_its_steps_follow() -> None:
    engine, _ = configs("--mixed", "1", "--prefill", "1", "--engine", "sim", "--sim-profile", "opt-13b-tp2")
    assert (engine.scheduler.schedule, engine.scheduler.latency_profile) == ("slo", "opt-13b-tp2")


def test_a_model_without_a_bundled_fit_needs_the_option() -> None:
    with pytest.raises(ValueError, match=r"needs --latency-profile NAME\|FILE: there is no bundled fit of tiny-llama on cpu"):
        configs("--mixed", "2", "--model", "tiny-llama", "--device", "cpu")
    with pytest.raises(ValueError, match="no bundled fit of smollm2-135m on cuda"):
        configs("--mixed", "2", "--model", "smollm2-135m", "--device", "cuda")
    engine, _ = configs("--mixed", "2", "--model", "tiny-llama", "--device", "cpu", "--latency-profile", "cpu-smollm2-135m")
    assert engine.scheduler.latency_profile == "cpu-smollm2-135m"


def test_without_mixed_workers_nothing_runs_the_slo_schedule() -> None:
    engine, coord = configs("--model", "tiny-llama", "--device", "cpu")
    assert (engine.scheduler.schedule, engine.scheduler.latency_profile) == ("chunked", None)
    assert "costs" not in coord.policy_options
    # Given anyway, the profile is checked and the cost model reads it.
    _, coord = configs("--model", "tiny-llama", "--latency-profile", "opt-13b-tp1")
    assert coord.policy_options["costs"].profile.name == "opt-13b-tp1"


def test_explicit_costs_win_and_bad_profiles_are_refused() -> None:
    _, coord = configs("--mixed", "1", "--model", "smollm2-135m", "--device", "cpu", "--policy-option", 'costs={"decode":[1,0,1]}')
    assert coord.policy_options["costs"] == {"decode": [1, 0, 1]}  # make_policy turns it into a CostModel
    with pytest.raises(ValueError, match="unknown latency profile 'nope'"):
        configs("--mixed", "1", "--latency-profile", "nope")
    from ecoserve.serve import add_arguments, engine_and_coordinator

    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(ValueError, match="--latency-profile is read by --policy ecoserve only; --policy vllm takes none"):
        engine_and_coordinator(p.parse_args(["--policy", "vllm", "--mixed", "1", "--latency-profile", "opt-13b-tp1"]))


@pytest.mark.parametrize(("argv", "counts"), [
    ([], (1, 1, 0)), (["--mixed", "2"], (0, 0, 2)), (["--prefill", "1", "--mixed", "1"], (1, 0, 1)),
    (["--prefill", "2", "--decode", "1", "--mixed", "1"], (2, 1, 1)),
])
def test_serve_s_worker_counts_default_to_none_beside_mixed_workers(argv: list[str], counts: tuple[int, int, int]) -> None:
    from ecoserve.serve import add_arguments, cluster_spec

    p = argparse.ArgumentParser()
    add_arguments(p)
    spec = cluster_spec(p.parse_args(argv))
    assert (spec.num_prefill, spec.num_decode, spec.num_mixed) == counts


def test_decode_workers_need_prefill_workers_and_prefill_workers_a_kv_destination() -> None:
    from ecoserve.launcher import ClusterSpec

    assert ClusterSpec(1, 0, 1).roles() == ["prefill", "mixed"]
    for counts in ((0, 1, 1), (1, 0, 0), (0, 2, 0)):
        with pytest.raises(ValueError, match="prefill and decode workers come together, or prefill with mixed workers"):
            ClusterSpec(*counts)

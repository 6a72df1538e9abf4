"""Root config validation: every bad value is refused with a message naming it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ecoserve.config import (
    CacheConfig, ClusterShape, CoordinatorConfig, EngineConfig, ModelConfig, SchedulerConfig, WorkerConfig,
)
from ecoserve.engine.llm_engine import LLMEngine
from ecoserve.launcher import ClusterSpec, worker_config_from_json, worker_config_to_json


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CacheConfig(gpu_memory_fraction=1.0), r"gpu_memory_fraction must be in \(0, 1\)"),
        (lambda: CacheConfig(block_size=12), "block_size must be a power of two"),
        (lambda: WorkerConfig(0, 2, "router", "tcp://x:1", "tcp://x:2"), "role must be one of"),
        (lambda: WorkerConfig(2, 2, "decode", "tcp://x:1", "tcp://x:2"), r"rank must be in \[0, world_size=2\)"),
        (lambda: CoordinatorConfig(port=70000), r"port must be in \[0, 65535\]"),
        (lambda: CoordinatorConfig(max_transfers_in_flight_per_pair=0), "max_transfers_in_flight_per_pair must be >= 1"),
        (lambda: ClusterSpec(1, 0, 0), "prefill and decode workers come together"),
        (lambda: ClusterSpec(0, 0, 0), "no workers"),
        (lambda: ClusterShape(prefill=-1), "the number of prefill instances must be an integer >= 0"),
        (lambda: ClusterShape(decode=2, tp_decode=0), "tp_decode .* must be an integer >= 1"),
        (lambda: ClusterShape(mixed=1.5), "the number of mixed instances must be an integer >= 0"),  # type: ignore[arg-type]
        (lambda: ClusterShape(1, 1, 1, 1).tp("router"), "role must be one of"),
        (lambda: SchedulerConfig(schedule="eager"), "unknown schedule 'eager'; choose one of chunked, prefill-priority"),
    ],
)
def test_bad_values_are_refused(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        build()


def test_gpu_memory_fraction_is_refused_on_cpu() -> None:
    config = EngineConfig(model=ModelConfig(model="tiny-llama", device="cpu"), cache=CacheConfig(gpu_memory_fraction=0.5))
    with pytest.raises(ValueError, match="gpu_memory_fraction sizes the KV pool on CUDA only"):
        LLMEngine(config)


def test_worker_config_round_trips_through_json() -> None:
    config = WorkerConfig(
        3, 4, "mixed", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
        EngineConfig(model=ModelConfig(model="tiny-llama", max_model_len=512), cache=CacheConfig(num_blocks=7),
                     scheduler=SchedulerConfig(schedule="prefill-priority")), secret="k",
    )
    assert worker_config_from_json(worker_config_to_json(config)) == config


@pytest.mark.parametrize(("options", "schedule"), [
    ([], "chunked"), (["--policy-option", "mode=chunked"], "chunked"),
    (["--policy-option", "mode=prefill-priority"], "prefill-priority"),
])
def test_workers_run_the_vllm_policys_schedule(options: list[str], schedule: str) -> None:
    from ecoserve.serve import add_arguments, engine_and_coordinator

    p = argparse.ArgumentParser()
    add_arguments(p)
    engine, coord = engine_and_coordinator(p.parse_args(["--policy", "vllm", "--mixed", "1", *options]))
    assert engine.scheduler.schedule == schedule
    assert LLMEngine(dataclasses.replace(engine, model=ModelConfig(model="tiny-llama", engine="sim"))).scheduler.prefill_priority == (
        schedule == "prefill-priority")


def test_cluster_shape_counts_gpus_ranks_and_labels() -> None:
    disagg = ClusterShape(prefill=2, tp_prefill=2, decode=3, tp_decode=1)
    assert (disagg.num_instances, disagg.gpus, disagg.label) == (5, 7, "2P TP2 : 3D TP1")
    assert disagg.roles() == ["prefill"] * 2 + ["decode"] * 3
    colocated = ClusterShape(mixed=4)
    assert (colocated.gpus, colocated.label, colocated.roles()) == (4, "4x TP1", ["mixed"] * 4)
    assert ClusterSpec(1, 2, 1).roles() == ClusterShape(1, 1, 2, 1, 1, 1).roles() == ["prefill", "decode", "decode", "mixed"]

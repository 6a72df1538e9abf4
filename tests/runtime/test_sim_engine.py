"""`ecoserve serve --engine sim`: the real coordinator, processes, sockets and KV transfer with
simulated workers. A request gets the tokens of an offline sim run, whichever workers serve
it; 2 prefill + 2 decode workers serve 50 concurrent requests (text and token prompts, greedy
and seeded) under both disaggregated policies and release every block; under-predicted ecoserve
runs swap KV out and back, which the sim engine checks."""

from __future__ import annotations

import asyncio
import random
from functools import lru_cache

import pytest

from ecoserve.client import AsyncClient, Completion
from ecoserve.config import CacheConfig, EngineConfig, ModelConfig
from ecoserve.coordinator.frontend import TextCodec
from ecoserve.engine.llm_engine import LLMEngine
from ecoserve.params import SamplingParams
from ecoserve.model.registry import resolve_model

SIM = ("--engine", "sim", "--sim-time-scale", "0.2")
WORDS = "the cat sat on a mat while seven quick foxes jumped over lazy dogs near the river bank".split()


@lru_cache(maxsize=None)
def workload(n: int) -> list[tuple[str | list[int], SamplingParams]]:
    """`n` requests: every third a text prompt, every fourth seeded sampling, the rest greedy."""
    rng = random.Random(n)
    out: list[tuple[str | list[int], SamplingParams]] = []
    for i in range(n):
        prompt: str | list[int]
        if i % 3 == 0:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
        else:
            prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 300))]
        seed = 100 + i if i % 4 == 0 else None
        temperature = 0.9 if seed is not None else 0.0
        out.append((prompt, SamplingParams(max_tokens=rng.randint(1, 48), temperature=temperature, seed=seed, ignore_eos=True)))
    return out


def offline_tokens(requests: list[tuple[str | list[int], SamplingParams]]) -> list[list[int]]:
    """The same requests through one in-process sim engine, tokenised as the coordinator does."""
    codec = TextCodec(resolve_model("tiny-llama"))
    engine = LLMEngine(EngineConfig(ModelConfig(model="tiny-llama", engine="sim", sim_time_scale=0.0), CacheConfig(num_blocks=4096)))
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", codec.encode(prompt) if isinstance(prompt, str) else prompt, params)
    while engine.has_unfinished():
        engine.step()
    return [engine.pop_finished(f"r{i}").output_token_ids for i in range(len(requests))]


async def serve(
    addr: str, requests: list[tuple[str | list[int], SamplingParams]], timeout: float = 120
) -> tuple[list[Completion], dict[str, float]]:
    async with await AsyncClient.connect(addr, timeout=30) as client:
        done = await asyncio.gather(*(client.generate(p, sp, timeout=timeout) for p, sp in requests))
        return list(done), await client.stats()


def check(addr: str, requests: list[tuple[str | list[int], SamplingParams]], timeout: float = 120) -> dict[str, float]:
    done, stats = asyncio.run(serve(addr, requests, timeout))
    assert [d.token_ids for d in done] == offline_tokens(requests)
    assert all(d.finish_reason == "length" and len(d.token_ids) == sp.max_tokens for d, (_, sp) in zip(done, requests))
    assert any(d.text.strip() for d in done), "sim tokens decode to text"
    assert stats["finished"] == len(requests) and stats["failed"] == 0
    assert stats["kv_used_blocks"] == 0 and stats["reserved_blocks"] == 0, "blocks left allocated after every request ended"
    return stats


def test_sim_cluster_tokens_equal_an_offline_sim_run(cluster) -> None:  # type: ignore[no-untyped-def]
    requests = workload(12)
    with cluster("tiny-llama", 1, 1, 0, *SIM) as addr:
        check(addr, requests)


@pytest.mark.parametrize("policy", ["distserve", "ecoserve"])
def test_sim_2p2d_serves_50_concurrent_requests_and_releases_every_block(cluster, policy: str) -> None:  # type: ignore[no-untyped-def]
    # 40 blocks of 16 per worker: the decode side cannot hold all 50 at once, so requests wait
    # for KV (and, under ecoserve, for their reservations) on the way.
    with cluster("tiny-llama", 2, 2, 0, *SIM, "--policy", policy, "--num-blocks", "40") as addr:
        stats = check(addr, workload(50))
    print({k: v for k, v in stats.items() if "." not in k})


@pytest.mark.parametrize("mode", ["chunked", "prefill-priority"])
def test_sim_vllm_modes_serve_on_a_mixed_worker(cluster, mode: str) -> None:  # type: ignore[no-untyped-def]
    # 40 blocks of 16: requests wait for room and are preempted by recompute on the way.
    options = ("--policy", "vllm", "--policy-option", f"mode={mode}", "--num-blocks", "40")
    with cluster("tiny-llama", 0, 0, 1, *SIM, *options) as addr:
        check(addr, workload(30))


def test_sim_under_predicted_ecoserve_swaps_and_keeps_tokens(cluster) -> None:  # type: ignore[no-untyped-def]
    """Every request predicted to produce 4 tokens on a 24-block decode pool: extensions run out
    of room and victims are swapped to the host and back; the sim checks the KV that returns."""
    options = (
        "--policy", "ecoserve", "--predictor", "fixed", "--predictor-option", "length=4",
        "--policy-option", "margin=0", "--policy-option", "preempt_mode=swap", "--policy-option", "buckets=[4,8,16,32,64]",
        "--num-blocks", "24", "--num-host-blocks", "8",
    )
    with cluster("tiny-llama", 1, 1, 0, *SIM, *options) as addr:
        stats = check(addr, workload(50), timeout=30)
    assert stats["extensions"] > 0 and stats["preemptions_swap"] > 0, stats


def test_serve_refuses_an_unknown_sim_profile_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from ecoserve.cli import main

    assert main(["serve", "--engine", "sim", "--sim-profile", "opt-7b", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "unknown latency profile 'opt-7b': give one of opt-13b-tp1" in err and "vllm-opt-66b-tp8" in err

"""The sim engine in one process: modelled step times, deterministic tokens through the real
`sample()`, KV written and checked, and its configuration errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ecoserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ecoserve.engine.llm_engine import LLMEngine
from ecoserve.params import SamplingParams
from ecoserve.engine.sim import SIM_HEAD_DIM, SIM_NUM_KV_HEADS, SIM_NUM_LAYERS, SimRunner, step_time_ms
from ecoserve.engine.sequence import Sequence, SequenceStatus
from ecoserve.latency.profile import load_profile, profile_names

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)


def make_engine(
    num_blocks: int | None = 64, budget: int = 64, host_blocks: int = 0, profile: str = "opt-13b-tp1", scale: float = 0.0
) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model="tiny-llama", engine="sim", sim_profile=profile, sim_time_scale=scale),
            cache=CacheConfig(block_size=4, num_blocks=num_blocks, num_host_blocks=host_blocks),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
        )
    )


def make_prompts(lens: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in lens]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        engine.step()
    out = [engine.pop_finished(r).output_token_ids for r in ids]
    engine.pool.assert_no_leaks()
    return out


def chunk_for(prompt_len: int, computed: int, new: int, outputs: int = 0):  # type: ignore[no-untyped-def]
    from ecoserve.engine.scheduler import ScheduledChunk
    from ecoserve.kv_cache import BlockTable

    seq = Sequence("r", list(range(prompt_len)), GREEDY, 0, BlockTable(4), output_token_ids=[5] * outputs)
    seq.num_computed_tokens = computed
    return ScheduledChunk(seq, new)


def test_step_time_follows_the_profile() -> None:
    prof = load_profile("opt-13b-tp1")
    a, b, c = prof.prefill
    # Whole prompts: a + b·Σl + c·Σl².
    prefills = [chunk_for(100, 0, 100), chunk_for(300, 0, 300)]
    assert step_time_ms(prof, prefills, []) == pytest.approx(a + b * 400 + c * (100**2 + 300**2))
    # A later chunk of n after s cached tokens costs c·n·(s + n) in the quadratic term.
    assert step_time_ms(prof, [chunk_for(300, 200, 100)], []) == pytest.approx(a + b * 100 + c * 100 * 300)
    # Decodes: a + b·Σctx + c·batch, the small-batch fit below the threshold, the large one at it.
    small = [chunk_for(50, 50 + i, 1, outputs=i + 1) for i in range(10)]
    ctx = sum(51 + i for i in range(10))
    a, b, c = prof.decode_small
    assert step_time_ms(prof, [], small) == pytest.approx(a + b * ctx + c * 10)
    large = [chunk_for(20, 20, 1, outputs=1)] * prof.large_batch_threshold
    a, b, c = prof.decode_large
    n = prof.large_batch_threshold
    assert step_time_ms(prof, [], large) == pytest.approx(a + b * 21 * n + c * n)
    # A mixed step is one fused pass (DistServe's fits measured none): both parts less the
    # smaller fixed cost; a profile that measured the additive form pays both.
    both = step_time_ms(prof, prefills, small)
    alone = step_time_ms(prof, prefills, []) + step_time_ms(prof, [], small)
    assert prof.mixed_form == "fused" and both == pytest.approx(alone - min(prof.prefill[0], prof.decode_small[0]))
    additive = dataclasses.replace(prof, mixed_form="additive")
    assert step_time_ms(additive, prefills, small) == pytest.approx(alone)
    assert step_time_ms(prof, [], []) == 0.0


def test_engine_steps_record_the_modelled_time_and_scale_the_wait() -> None:
    engine = make_engine(scale=0.0)
    runner = engine.runner
    assert isinstance(runner, SimRunner)
    engine.add_request("r0", list(range(3, 43)), GREEDY)
    engine.step()  # the whole 40-token prompt
    a, b, c = runner.profile.prefill
    assert runner.last_step_ms == pytest.approx(a + b * 40 + c * 40**2)
    engine.step()  # one decode with 41 tokens of context
    a, b, c = runner.profile.decode_small
    assert runner.last_step_ms == pytest.approx(a + b * 41 + c)
    opt66 = make_engine(profile="opt-66b-tp2").runner
    assert isinstance(opt66, SimRunner) and opt66.profile.prefill != runner.profile.prefill


def test_tokens_depend_on_prompt_and_position_only() -> None:
    prompts = make_prompts([5, 11, 17, 3, 9, 30])
    alone = [run(make_engine(), [p])[0] for p in prompts]
    batched = run(make_engine(budget=16), prompts)  # chunked prefill, other batch mates
    assert batched == alone
    assert run(make_engine(), prompts) == batched, "a re-run gives the same tokens"
    assert len({t for out in alone for t in out}) > 40, "degenerate outputs would prove little"
    assert all(t not in (0, 1, 2) for out in alone for t in out), "special tokens are never targets"
    # Seeded sampling goes through the real sample(): the same draw every run, not the greedy one.
    seeded = run(make_engine(), prompts, SEEDED)
    assert run(make_engine(budget=16), prompts, SEEDED) == seeded
    assert seeded != alone


def test_kv_holds_tokens_and_survives_swap_and_recompute() -> None:
    prompts = make_prompts([9, 14])
    expected = run(make_engine(), prompts)
    engine = make_engine(host_blocks=16)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    for _ in range(4):
        engine.step()
    seq = engine.sequences["r0"]
    slot = seq.block_table.slot(3)
    runner = engine.runner
    assert isinstance(runner, SimRunner)
    assert runner.kv_slots[:, 0, slot].unique().tolist() == [float(prompts[0][3])]  # K = token id
    assert runner.kv_slots[:, 1, slot].unique().tolist() == [3.0]  # V = position
    blocks = list(seq.block_table.blocks)
    assert engine.preempt("r0", "swap") == "swap"
    engine.runner.kv_cache[:, :, blocks] = 1e4  # what comes back must come from the host copy
    assert engine.preempt("r1", "recompute") == "recompute"
    engine.step()
    assert engine.resume("r0") and engine.resume("r1")
    while engine.has_unfinished():
        engine.step()
    assert [engine.pop_finished(f"r{i}").output_token_ids for i in range(2)] == expected
    engine.pool.assert_no_leaks()
    assert engine.swap_space is not None
    engine.swap_space.pool.assert_no_leaks()


def test_lost_kv_stops_the_engine_with_a_message() -> None:
    engine = make_engine()
    engine.add_request("r0", list(range(3, 13)), GREEDY)
    engine.step()
    seq = engine.sequences["r0"]
    assert seq.status is SequenceStatus.RUNNING
    engine.runner.kv_cache[:, :, seq.block_table.blocks] = 0.0
    with pytest.raises(RuntimeError, match="KV of request 'r0' at position 9 .* lost in a transfer or a swap"):
        engine.step()


def test_sim_spec_and_pool_follow_model_and_profile() -> None:
    engine = make_engine(num_blocks=None)
    spec = engine.spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (SIM_NUM_LAYERS, SIM_NUM_KV_HEADS, SIM_HEAD_DIM)
    assert spec.vocab_size == 49152 and spec.eos_token_ids == (2,) and engine.max_model_len == 2048
    assert engine.pool.num_blocks == 66144 // 4  # DistServe's measured OPT-13B TP1 capacity
    assert engine.model_id == "tiny-llama (sim opt-13b-tp1)" and engine.device == "cpu"
    assert engine.runner.kv_cache.dtype == torch.float32


def test_profile_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    fit = {"prefill": [1.0, 0.5, 0.0], "decoding_smallbs": [2.0, 0.0, 1.0], "decoding_largebs": [2.0, 0.0, 1.0],
           "decoding_large_small_bs_threshold": 8, "max_num_tokens": 400}
    path.write_text(json.dumps(fit))
    prof = load_profile(str(path))
    assert prof.prefill_ms(10, 100) == 6.0 and prof.decode_ms(3, 99) == 5.0
    engine = make_engine(num_blocks=None, profile=str(path))
    assert engine.pool.num_blocks == 100
    path.write_text(json.dumps({**fit, "prefill": [1.0, 2.0]}))
    with pytest.raises(ValueError, match=r"prefill must be three finite numbers \[a, b, c\]"):
        load_profile(str(path))


def test_config_errors_name_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"engine must be one of \('model', 'sim'\), got 'fake'"):
        ModelConfig(engine="fake")
    with pytest.raises(ValueError, match="unknown latency profile 'opt-7b': give one of opt-13b-tp1, opt-13b-tp2"):
        ModelConfig(engine="sim", sim_profile="opt-7b")
    with pytest.raises(ValueError, match="sim_time_scale must be a finite number >= 0"):
        ModelConfig(engine="sim", sim_time_scale=-1.0)
    with pytest.raises(ValueError, match="the sim engine runs on the CPU"):
        ModelConfig(engine="sim", device="cuda")
    with pytest.raises(ValueError, match="keeps its KV in float32"):
        ModelConfig(engine="sim", dtype="bfloat16")
    ModelConfig(engine="model", sim_profile="not-checked-unless-sim")
    assert "opt-66b-tp8" in profile_names() and "vllm-opt-13b-tp1" in profile_names()


def test_a_step_that_samples_nothing_runs() -> None:
    """A long prompt alone, chunked under the budget: its first steps sample no token (an
    empty logits batch), which once made the sim worker crash on an index dtype."""
    engine = make_engine(budget=16)
    prompt = make_prompts([50])[0]
    assert engine.runner.logits([]).shape[0] == 0  # type: ignore[attr-defined]
    assert run(engine, [prompt]) == run(make_engine(budget=64), [prompt])

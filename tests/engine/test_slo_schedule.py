"""The "slo" schedule (EcoServe's iteration, DESIGN §4.1): every decode each step, and prompt
tokens up to the budget for which the latency profile predicts the step within the smallest TPOT
target among the decodes; whole prompts and chunks of long ones join decode iterations."""

from __future__ import annotations

import pytest

from ecoserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ecoserve.engine.llm_engine import LLMEngine
from ecoserve.engine.prompt_budget import PromptBudget
from ecoserve.engine.scheduler import FCFSScheduler, SchedulerOutput
from ecoserve.engine.sequence import Sequence
from ecoserve.engine.sim import step_time_ms
from ecoserve.kv_cache import BlockPool, BlockTable
from ecoserve.latency.profile import load_profile
from ecoserve.params import SamplingParams

PROFILE = load_profile("cpu-smollm2-135m")  # fused mixed steps, padded decode context
BUDGET = 256  # max_num_batched_tokens


def make_scheduler(num_blocks: int = 256, max_num_seqs: int = 16) -> FCFSScheduler:
    return FCFSScheduler(BlockPool(num_blocks, block_size=4), max_num_seqs, BUDGET, slo_profile=PROFILE)


def make_sequence(i: int, prompt_len: int, max_tokens: int, target: float | None) -> Sequence:
    seq = Sequence(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), i, BlockTable(4))
    seq.tpot_target_ms = target
    return seq


def apply(sched: FCFSScheduler, out: SchedulerOutput, token: int = 7) -> None:
    """The engine's update: progress, a token where sampled, finish at max_tokens."""
    for chunk in out.prefills + out.decodes:
        seq = chunk.seq
        seq.num_computed_tokens += chunk.num_new_tokens
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(token)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish(seq)


def test_each_step_keeps_the_smallest_tpot_target_while_prompts_join_decode_iterations() -> None:
    """1. Four requests decode (targets 400 and 300 ms, one with none); 2. six prompts of 9 to
    200 tokens wait; 3. every step's predicted time (engine/sim.py's model of the step actually
    scheduled) is within the smallest target of the requests decoding in it, prompts are admitted
    into decode iterations (whole or in chunks), and the budget binds where the chunked schedule
    would have broken the target; 4. every block comes back."""
    sched = make_scheduler()
    decoders = [make_sequence(i, 40, 60, t) for i, t in enumerate([400.0, 300.0, None, 400.0])]
    for seq in decoders:
        sched.add(seq)
    apply(sched, sched.schedule())  # their prompts, alone: nothing decodes yet
    assert all(s.output_token_ids for s in decoders)
    prompts = [make_sequence(4 + i, n, 6, 350.0) for i, n in enumerate([9, 200, 30, 120, 64, 17])]
    for seq in prompts:
        sched.add(seq)
    mixed = cut = 0
    while sched.has_unfinished():
        waiting_before = bool(sched.waiting) or any(s.num_uncomputed > 1 for s in sched.running)
        out = sched.schedule()
        assert not out.preempted and not out.empty
        if out.decodes:
            target = min((c.seq.tpot_target_ms for c in out.decodes if c.seq.tpot_target_ms is not None), default=None)
            assert target is not None  # a request with a target decodes in every such step here
            predicted = step_time_ms(PROFILE, out.prefills, out.decodes)
            assert predicted <= target + 1e-9, (predicted, target)
            prompt_tokens = sum(c.num_new_tokens for c in out.prefills)
            assert sched.last_budget is not None and prompt_tokens <= sched.last_budget.initial_tokens
            mixed += bool(out.prefills)
            if waiting_before and prompt_tokens < BUDGET - len(out.decodes):
                cut += 1
                # The chunked schedule's step (the whole budget of prompt tokens) would break it.
                ctx = [c.seq.num_computed_tokens + 1 for c in out.decodes]
                n = BUDGET - len(out.decodes)
                assert PROFILE.mixed_ms(n, n * n, len(ctx), sum(ctx), max(ctx)) > target
        apply(sched, out)
    assert mixed >= 3, "prompts must be admitted into decode iterations"
    assert cut >= 1, "the SLO budget must bind at least once, or this test shows nothing"
    assert all(len(s.output_token_ids) == s.params.max_tokens for s in decoders + prompts)
    sched.pool.assert_no_leaks()


def test_the_smallest_target_among_the_decodes_sets_the_budget_and_none_is_ignored() -> None:
    def budget(targets: list[float | None]) -> int:
        seqs = [make_sequence(i, 40, 8, t) for i, t in enumerate(targets)]
        for s in seqs:
            s.output_token_ids.append(1)
            s.num_computed_tokens = s.num_tokens - 1
        return PromptBudget(PROFILE, seqs, BUDGET - len(seqs)).tokens

    assert budget([None, None]) == BUDGET - 2  # no targets: the chunked budget
    assert budget([]) == BUDGET  # nothing decodes: no TPOT to keep
    tight, loose = budget([300.0, None]), budget([400.0, None])
    assert 0 < tight < loose < BUDGET - 2
    assert budget([400.0, 300.0]) == tight
    assert budget([50.0, None]) == 0  # the decodes alone take longer than the target


def test_a_continued_chunk_of_a_long_prompt_is_cut_to_its_attention_cost() -> None:
    """A chunk after s cached tokens adds n·(s + n) to Σl², more than the fresh-chunk bound
    assumed: the step is cut so that its predicted time still stays within the target."""
    decoder = make_sequence(0, 40, 8, 350.0)
    decoder.output_token_ids.append(1)
    decoder.num_computed_tokens = decoder.num_tokens - 1
    budget = PromptBudget(PROFILE, [decoder], BUDGET - 1)
    fresh = budget.take(0, 1000)
    assert fresh == budget.tokens > 0
    continued = budget.take(4000, 1000)
    assert 0 < continued < fresh
    assert budget.predicted_ms(4000, continued) <= 350.0 < budget.predicted_ms(4000, continued + 1)


def make_engine(schedule: str, profile: str | None = None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model="tiny-llama", engine="sim", sim_profile="cpu-smollm2-135m", sim_time_scale=0.0),
            cache=CacheConfig(block_size=4, num_blocks=256),
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128, schedule=schedule, latency_profile=profile),
        )
    )


def test_the_engine_counts_mixed_steps_and_its_tokens_do_not_depend_on_the_schedule() -> None:
    lens = [33, 7, 90, 15, 60, 4]
    prompts = [[(13 * i + 7 * j) % 40000 + 3 for j in range(n)] for i, n in enumerate(lens)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outputs = {}
    for schedule in ("chunked", "slo"):
        engine = make_engine(schedule, "cpu-smollm2-135m" if schedule == "slo" else None)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
            engine.sequences[f"r{i}"].tpot_target_ms = 250.0
            engine.step()  # each arrives while the earlier ones decode
        while engine.has_unfinished():
            engine.step()
        outputs[schedule] = [engine.pop_finished(f"r{i}").output_token_ids for i in range(len(prompts))]
        engine.pool.assert_no_leaks()
        if schedule == "slo":
            assert engine.slo_profile is not None and engine.num_mixed_steps > 0
    assert outputs["slo"] == outputs["chunked"]


def test_the_slo_schedule_needs_a_profile_that_loads() -> None:
    with pytest.raises(ValueError, match="the slo schedule needs latency_profile"):
        SchedulerConfig(schedule="slo")
    with pytest.raises(ValueError, match="unknown latency profile 'no-such': give one of opt-13b-tp1.*cpu-smollm2-135m"):
        SchedulerConfig(schedule="slo", latency_profile="no-such")
    assert load_profile("cpu-smollm2-135m").decode_context == "padded"

"""Coordinator-directed preemption, resume and KV reservations in the single-process engine.

Every run is compared with an uninterrupted run of the same prompts: greedy tokens must not
change whether a request is swapped to host memory, dropped and recomputed, held at its
reservation, or all of these in turn while others keep running. Every run ends with the device
pool and the host swap space fully free.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from ecoserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ecoserve.engine.llm_engine import LLMEngine
from ecoserve.params import SamplingParams
from ecoserve.engine.scheduler import FCFSScheduler
from ecoserve.engine.sequence import Sequence, SequenceStatus
from ecoserve.kv_cache import BlockPool, BlockTable

BLOCK_SIZE = 4
PROMPT_LENS = [5, 11, 17, 3, 9]
MAX_TOKENS = 24
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

Action = Callable[[LLMEngine], None]


def make_engine(num_blocks: int = 128, num_host_blocks: int = 64, budget: int = 32) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model="tiny-llama", dtype="float32", device="cpu", max_model_len=256),
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, num_host_blocks=num_host_blocks),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
        )
    )


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 49152, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def reference(prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of an uninterrupted run."""
    tokens = [s.output_token_ids for s in run(make_engine(), prompts)]
    assert len({t for out in tokens for t in out}) > 32, "degenerate reference outputs would prove little"
    return tokens


def run(engine: LLMEngine, prompts: list[list[int]], actions: dict[int, list[Action]] | None = None) -> list[Sequence]:
    """Add every prompt as r0, r1, ...; step until all finish, doing `actions[i]` before step i."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, PARAMS)
    actions = dict(actions or {})
    for step in range(500):
        for act in actions.pop(step, []):
            act(engine)
        if not actions and all(engine.sequences[r].status is SequenceStatus.FINISHED for r in ids):
            break
        engine.step()
    else:
        pytest.fail("the run did not finish in 500 steps")
    seqs = [engine.pop_finished(r) for r in ids]
    assert_clean(engine)
    return seqs


def assert_clean(engine: LLMEngine) -> None:
    """No request left and every block back: on the device and in the host swap space."""
    sched = engine.scheduler
    assert not engine.sequences and not sched.running and not sched.waiting and not sched.parked
    engine.pool.assert_no_leaks()
    if engine.swap_space is not None:
        engine.swap_space.pool.assert_no_leaks()


def preempt(rid: str, mode: str, expected: str | None = None) -> Action:
    def act(engine: LLMEngine) -> None:
        seq = engine.sequences[rid]
        computed, blocks = seq.num_computed_tokens, list(seq.block_table.blocks)
        free_before = engine.pool.num_free
        assert engine.preempt(rid, mode) == (expected or mode)
        assert seq.status is SequenceStatus.PARKED and seq.preempt_mode == (expected or mode)
        assert seq not in engine.scheduler.running and seq not in engine.scheduler.waiting
        assert seq.block_table.blocks == [] and engine.pool.num_free == free_before + len(blocks)
        if seq.preempt_mode == "swap":
            assert seq.num_computed_tokens == computed
            assert len(seq.host_blocks) == engine.pool.blocks_for_tokens(computed)
        else:
            assert seq.num_computed_tokens == 0 and seq.host_blocks == []
        # Others may reuse the freed blocks at once: what comes back must come from host memory.
        engine.runner.kv_cache[:, :, blocks] = 1e4

    return act


def resume(rid: str) -> Action:
    def act(engine: LLMEngine) -> None:
        seq = engine.sequences[rid]
        swapped = seq.preempt_mode == "swap"
        assert engine.resume(rid) is True
        assert seq.preempt_mode is None and seq.host_blocks == []
        if swapped:
            assert seq.status is SequenceStatus.RUNNING
            order = [s.arrival_index for s in engine.scheduler.running]
            assert order == sorted(order), "a swapped-in request rejoins the running in arrival order"
        else:
            assert seq.status is SequenceStatus.WAITING and engine.scheduler.waiting[0] is seq

    return act


def outputs_frozen(rid: str, count: int) -> Action:
    """While parked a request produces nothing."""

    def act(engine: LLMEngine) -> None:
        assert len(engine.sequences[rid].output_token_ids) == count

    return act


# --- preempt and resume ------------------------------------------------------------------


def test_swap_out_then_resume_keeps_tokens(prompts: list[list[int]], reference: list[list[int]]) -> None:
    engine = make_engine()
    seen: dict[str, int] = {}

    def record(e: LLMEngine) -> None:
        seen["outputs"] = len(e.sequences["r1"].output_token_ids)
        assert e.swap_space is not None and e.swap_space.num_free < e.swap_space.num_blocks

    def check_frozen(e: LLMEngine) -> None:
        outputs_frozen("r1", seen["outputs"])(e)

    seqs = run(engine, prompts, {3: [preempt("r1", "swap"), record], 7: [check_frozen, resume("r1")]})
    assert [s.output_token_ids for s in seqs] == reference
    assert [s.num_preemptions for s in seqs] == [0, 1, 0, 0, 0]


def test_recompute_then_resume_keeps_tokens(prompts: list[list[int]], reference: list[list[int]]) -> None:
    engine = make_engine()
    seqs = run(engine, prompts, {4: [preempt("r2", "recompute")], 6: [resume("r2")]})
    assert [s.output_token_ids for s in seqs] == reference
    assert seqs[2].num_preemptions == 1


def test_many_cycles_mixing_swap_and_recompute(prompts: list[list[int]], reference: list[list[int]]) -> None:
    engine = make_engine()
    actions: dict[int, list[Action]] = {
        3: [preempt("r0", "swap"), preempt("r2", "recompute")],
        5: [resume("r2"), preempt("r4", "swap")],
        7: [resume("r0"), preempt("r1", "recompute")],
        9: [resume("r4"), resume("r1")],
        12: [preempt("r0", "recompute"), preempt("r3", "swap"), preempt("r4", "swap")],
        13: [resume("r4")],
        15: [resume("r3"), resume("r0"), preempt("r4", "recompute")],
        16: [resume("r4")],
    }
    seqs = run(engine, prompts, actions)
    assert [s.output_token_ids for s in seqs] == reference
    assert [s.num_preemptions for s in seqs] == [2, 1, 1, 1, 3]


def test_swap_without_swap_space_recomputes(prompts: list[list[int]], reference: list[list[int]]) -> None:
    engine = make_engine(num_host_blocks=0)
    assert engine.swap_space is None
    seqs = run(engine, prompts, {3: [preempt("r1", "swap", expected="recompute")], 5: [resume("r1")]})
    assert [s.output_token_ids for s in seqs] == reference


def test_full_swap_space_falls_back_to_recompute_and_changes_nothing(
    prompts: list[list[int]], reference: list[list[int]]
) -> None:
    # 6 host blocks of 4 tokens: r0 (5-token prompt) swaps into 2 of them at step 2; r2
    # (17-token prompt, 5 blocks computed by step 3) cannot fit in the other 4.
    engine = make_engine(num_host_blocks=6)
    kept: dict[str, object] = {}

    def snapshot(e: LLMEngine) -> None:
        assert e.swap_space is not None
        kept["free"] = e.swap_space.num_free
        kept["host"] = e.swap_space.kv.clone()
        kept["r0"] = list(e.sequences["r0"].host_blocks)

    def unchanged(e: LLMEngine) -> None:
        assert e.swap_space is not None
        assert e.swap_space.num_free == kept["free"] == 4
        assert torch.equal(e.swap_space.kv, kept["host"])  # type: ignore[arg-type]
        assert e.sequences["r0"].host_blocks == kept["r0"]

    actions: dict[int, list[Action]] = {
        2: [preempt("r0", "swap"), snapshot],
        3: [preempt("r2", "swap", expected="recompute"), unchanged],
        5: [resume("r2"), resume("r0")],
    }
    seqs = run(engine, prompts, actions)
    assert [s.output_token_ids for s in seqs] == reference


def test_resume_waits_for_device_blocks(prompts: list[list[int]], reference: list[list[int]]) -> None:
    # 16 device blocks: while a 48-token prompt holds 12, the 5 that r0's KV needs are not free.
    engine = make_engine(num_blocks=16)
    engine.add_request("a", prompts[2], PARAMS)
    for _ in range(3):
        engine.step()
    a = engine.sequences["a"]
    assert engine.preempt("a", "swap") == "swap" and len(a.host_blocks) == 5
    engine.add_request("b", list(range(1, 49)), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    host, free = list(a.host_blocks), engine.pool.num_free
    assert free < 5
    assert engine.resume("a") is False
    assert a.status is SequenceStatus.PARKED and a.host_blocks == host and engine.pool.num_free == free
    while engine.sequences["b"].status is not SequenceStatus.FINISHED:
        engine.step()
    engine.pop_finished("b")
    assert engine.resume("a") is True
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_finished("a").output_token_ids == reference[2]
    assert_clean(engine)


# --- reservations --------------------------------------------------------------------------


def test_reservation_holds_at_its_cap_and_a_raise_releases_it(
    prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """r3 has a 3-token prompt. Reserving 8 tokens caps it at 2 blocks, KV for 8 tokens: it
    samples 8 - 3 + 1 = 6 tokens (the last one needs no KV yet), then is held."""
    engine = make_engine()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, PARAMS)
    r3 = engine.sequences["r3"]
    engine.set_reservation("r3", 8)
    while r3.num_computed_tokens < 8:
        engine.step()
        assert "r3" not in engine.scheduler.held
    assert len(r3.output_token_ids) == 6 and len(r3.block_table.blocks) == 2
    # 1. Held: no token, blocks kept, listed in `held` at every step; the others go on.
    for _ in range(3):
        outs = engine.step()
        assert engine.scheduler.held == ["r3"]
        assert "r3" not in {o.request_id for o in outs} and outs
        assert len(r3.output_token_ids) == 6 and len(r3.block_table.blocks) == 2
        assert r3.status is SequenceStatus.RUNNING
    # 2. A reservation below what it has is refused and changes nothing.
    with pytest.raises(ValueError, match=r"below the 9 tokens it already has \(3 prompt \+ 6 generated\)"):
        engine.set_reservation("r3", 8)
    with pytest.raises(ValueError, match="a reservation is a number of tokens"):
        engine.set_reservation("r3", True)  # type: ignore[arg-type]
    assert r3.reserved_tokens == 8
    # 3. Raised to 12: it goes on at once, and is held again at KV for 12 tokens, 10 sampled.
    engine.set_reservation("r3", 12)
    assert "r3" in {o.request_id for o in engine.step()}
    others = [engine.sequences[f"r{i}"] for i in (0, 1, 2, 4)]
    while any(s.status is not SequenceStatus.FINISHED for s in others):
        engine.step()
    assert r3.num_computed_tokens == 12 and len(r3.output_token_ids) == 10
    # 4. Only a held request is left: steps do nothing, yet it is unfinished.
    assert engine.step() == [] and engine.scheduler.held == ["r3"] and engine.has_unfinished()
    assert engine.last_num_scheduled_tokens == 0
    # 5. A recompute of a reserved request re-prefills only up to its cap, samples nothing,
    #    and is held again.
    assert engine.preempt("r3", "recompute") == "recompute"
    assert engine.resume("r3") is True
    assert engine.step() == [] and r3.num_computed_tokens == 12 and len(r3.block_table.blocks) == 3
    assert engine.last_num_scheduled_tokens == 12  # work done, though no output
    assert engine.step() == [] and engine.scheduler.held == ["r3"] and engine.last_num_scheduled_tokens == 0
    # 6. No limit: it finishes with the reference tokens.
    engine.set_reservation("r3", None)
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.held == []
    seqs = [engine.pop_finished(f"r{i}") for i in range(len(prompts))]
    assert [s.output_token_ids for s in seqs] == reference
    assert_clean(engine)


def test_a_swapped_request_keeps_its_reservation(prompts: list[list[int]], reference: list[list[int]]) -> None:
    engine = make_engine()

    def reserve(e: LLMEngine) -> None:
        e.set_reservation("r0", 12)  # 5-token prompt: held once 8 tokens are sampled

    def held(e: LLMEngine) -> None:
        assert e.scheduler.held == ["r0"] and len(e.sequences["r0"].output_token_ids) == 8

    def lift(e: LLMEngine) -> None:
        e.set_reservation("r0", None)

    actions: dict[int, list[Action]] = {
        0: [reserve],
        3: [preempt("r0", "swap")],
        5: [resume("r0")],
        12: [held, preempt("r0", "swap")],
        13: [resume("r0")],
        15: [held, lift],
    }
    seqs = run(engine, prompts, actions)
    assert [s.output_token_ids for s in seqs] == reference


def test_a_held_sequence_does_not_preempt_others_to_grow() -> None:
    # 4 blocks of 4. r0 (8 tokens, reserved 8) fills 2 blocks, r1 (4 tokens) 1. Unreserved,
    # r0 would take the last free block and r1 would then have to be preempted.
    sched = FCFSScheduler(BlockPool(4, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    r0, r1 = (
        Sequence(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=8), i, BlockTable(4))
        for i, n in enumerate([8, 4])
    )
    sched.add(r0)
    sched.add(r1)
    sched.set_reservation(r0, 8)
    out = sched.schedule()
    for chunk in out.prefills:
        chunk.seq.num_computed_tokens += chunk.num_new_tokens
        chunk.seq.output_token_ids.append(7)
    out = sched.schedule()
    assert sched.held == ["r0"] and out.preempted == [] and not sched.preempted_log
    assert [c.seq for c in out.decodes] == [r1] and sched.pool.num_free == 0
    for seq in (r0, r1):
        sched.finish(seq)
    sched.pool.assert_no_leaks()


def test_a_one_token_chunk_of_a_recompute_is_a_prefill_not_a_decode() -> None:
    """A recomputing request with several tokens left that gets a 1-token chunk (the last of
    the step's budget) must not sample: it is a prefill chunk, not a decode."""
    sched = FCFSScheduler(BlockPool(8, block_size=4), max_num_seqs=8, max_num_batched_tokens=1)
    seq = Sequence("r0", [1, 2, 3], SamplingParams(max_tokens=8), 0, BlockTable(4), output_token_ids=[4, 5])
    sched.add(seq)
    for _ in range(4):  # 5 tokens (3 prompt + 2 generated) to recompute, one per step
        out = sched.schedule()
        assert [c.seq for c in out.prefills] == [seq] and out.decodes == []
        seq.num_computed_tokens += 1
    out = sched.schedule()  # the last token: it samples, a decode
    assert [c.seq for c in out.decodes] == [seq] and out.prefills == []


# --- errors and release --------------------------------------------------------------------


def test_bad_orders_are_refused(prompts: list[list[int]]) -> None:
    engine = make_engine(budget=8)
    engine.add_request("a", prompts[2], PARAMS)  # 17 tokens: three chunks of at most 8
    engine.add_request("b", prompts[0], PARAMS)
    with pytest.raises(ValueError, match=r"preempt mode must be one of \('swap', 'recompute'\), got 'evict'"):
        engine.preempt("a", "evict")
    with pytest.raises(ValueError, match="unknown request id 'zz'"):
        engine.preempt("zz", "swap")
    with pytest.raises(ValueError, match="'a' is waiting; only a running request"):
        engine.preempt("a", "swap")
    engine.step()
    with pytest.raises(ValueError, match="'a' is still prefilling its prompt"):
        engine.preempt("a", "recompute")
    with pytest.raises(ValueError, match="'a' is running; only a parked request can be resumed"):
        engine.resume("a")
    for _ in range(3):
        engine.step()
    assert engine.preempt("a", "swap") == "swap"
    with pytest.raises(ValueError, match="'a' is parked; only a running request"):
        engine.preempt("a", "swap")
    with pytest.raises(ValueError, match="unknown request id"):
        engine.set_reservation("zz", 100)
    assert engine.resume("a") is True
    with pytest.raises(ValueError, match="only a parked request can be resumed"):
        engine.resume("a")
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="'a' is finished"):
        engine.set_reservation("a", 100)
    for rid in ("a", "b"):
        engine.pop_finished(rid)
    assert_clean(engine)


def test_release_frees_device_and_host_blocks_in_every_state(prompts: list[list[int]]) -> None:
    engine = make_engine()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, PARAMS)
    for _ in range(3):
        engine.step()
    engine.set_reservation("r4", engine.sequences["r4"].num_tokens)  # held within a block
    for _ in range(BLOCK_SIZE + 1):
        engine.step()
    assert engine.scheduler.held == ["r4"]
    assert engine.preempt("r0", "swap") == "swap"
    assert engine.preempt("r1", "recompute") == "recompute"
    assert engine.swap_space is not None and engine.swap_space.num_free < engine.swap_space.num_blocks
    engine.add_request("late", prompts[3], PARAMS)  # still waiting
    # swapped, recomputed, running, held, waiting, and an id the engine does not know
    for rid in ("r0", "r1", "r2", "r4", "late"):
        seq = engine.release(rid)
        assert seq is not None and seq.status is SequenceStatus.FINISHED and seq.host_blocks == []
        assert seq.block_table.blocks == []
    assert engine.release("nope") is None
    assert engine.release("r0") is None  # already released
    while engine.has_unfinished():
        engine.step()
    engine.pop_finished("r3")
    assert_clean(engine)


def test_num_host_blocks_is_validated() -> None:
    with pytest.raises(ValueError, match=r"num_host_blocks must be an integer >= 0 \(0: no host swap space\), got -1"):
        CacheConfig(num_host_blocks=-1)

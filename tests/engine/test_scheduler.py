"""The local FCFS batcher: budgets, chunked prefill, preemption by recompute, no leaks."""

from __future__ import annotations

from ecoserve.params import SamplingParams
from ecoserve.engine.scheduler import FCFSScheduler, SchedulerOutput
from ecoserve.engine.sequence import Sequence, SequenceStatus
from ecoserve.kv_cache import BlockPool, BlockTable


def make_requests(prompt_lens: list[int], block_size: int = 4, max_tokens: int = 8) -> list[Sequence]:
    return [
        Sequence(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), i, BlockTable(block_size))
        for i, n in enumerate(prompt_lens)
    ]


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 16) -> FCFSScheduler:
    return FCFSScheduler(BlockPool(num_blocks, block_size=4), max_num_seqs, budget)


def apply(out: SchedulerOutput, token: int = 7) -> None:
    """What the engine does after execute: advance progress, append a token where sampled."""
    for chunk in out.prefills + out.decodes:
        chunk.seq.num_computed_tokens += chunk.num_new_tokens
        if chunk.seq.num_computed_tokens == chunk.seq.num_tokens:
            chunk.seq.output_token_ids.append(token)


def test_token_budget_and_chunked_prefill() -> None:
    sched = make_scheduler(budget=16)
    a, b = make_requests([10, 20])
    sched.add(a)
    sched.add(b)
    # 1. Step one: all of a (10) and the first 6 tokens of b fill the budget of 16.
    out = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.prefills] == [("r0", 10), ("r1", 6)]
    apply(out)
    # 2. Step two: a decodes one token; b continues with the remaining 14.
    out = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.decodes] == [("r0", 1)]
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.prefills] == [("r1", 14)]
    apply(out)
    # 3. Both decode; blocks were taken on demand.
    out = sched.schedule()
    assert len(out.decodes) == 2 and not out.prefills
    assert len(a.block_table.blocks) == 3  # 11 tokens + 1 being computed -> 3 blocks of 4
    for seq in (a, b):
        sched.finish(seq)
    sched.pool.assert_no_leaks()


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=100)
    for seq in make_requests([3, 3, 3]):
        sched.add(seq)
    out = sched.schedule()
    assert len(out.prefills) == 2 and len(sched.waiting) == 1


def test_preemption_evicts_the_newest_and_recomputes() -> None:
    # 4 blocks of 4 tokens; two sequences of 8 tokens fill the pool.
    sched = make_scheduler(num_blocks=4, budget=64)
    old, new = make_requests([8, 8])
    sched.add(old)
    sched.add(new)
    apply(sched.schedule())
    assert sched.pool.num_free == 0
    # 1. Both need a 9th-token block: the older one takes the newer one's blocks.
    out = sched.schedule()
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert new.block_table.blocks == [] and sched.waiting[0] is new
    assert [c.seq for c in out.decodes] == [old]
    # 2. Once the old one finishes, the new one is recomputed: prompt plus its sampled token.
    apply(out)
    sched.finish(old)
    out = sched.schedule()
    assert [(c.seq, c.num_new_tokens) for c in out.prefills] == [(new, 9)]
    sched.finish(new)
    sched.pool.assert_no_leaks()


def test_waiting_request_does_not_start_without_blocks() -> None:
    sched = make_scheduler(num_blocks=2, budget=64)
    a, b = make_requests([8, 4])
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [c.seq for c in out.prefills] == [a]
    assert list(sched.waiting) == [b] and b.block_table.blocks == []


def test_prefill_priority_runs_whole_prompts_and_pauses_decodes() -> None:
    sched = FCFSScheduler(BlockPool(64, block_size=4), 8, 16, prefill_priority=True)
    a, b, c, d = make_requests([10, 20, 5, 4])
    sched.add(a)
    # 1. Step one: a's whole prompt.
    out = sched.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.prefills] == [("r0", 10)] and not out.decodes
    apply(out)
    # 2. b (longer than the budget) and c wait: b starts alone with a budget-sized chunk, a waits.
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.prefills] == [("r1", 16)] and not out.decodes
    apply(out)
    # 3. b's rest, then c whole (4 + 5 <= 16); still no decode while prompts wait.
    out = sched.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.prefills] == [("r1", 4), ("r2", 5)]
    assert not out.decodes
    apply(out)
    # 4. No prompt waits: everyone decodes.
    out = sched.schedule()
    assert sorted(x.seq.request_id for x in out.decodes) == ["r0", "r1", "r2"] and not out.prefills
    apply(out)
    # 5. A new prompt pauses the decodes again.
    sched.add(d)
    out = sched.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.prefills] == [("r3", 4)] and not out.decodes
    for seq in (a, b, c, d):
        sched.finish(seq)
    sched.pool.assert_no_leaks()


def test_prefill_priority_decodes_when_no_waiting_prompt_fits() -> None:
    sched = FCFSScheduler(BlockPool(5, block_size=4), 8, 16, prefill_priority=True)
    a, b = make_requests([8, 16])
    sched.add(a)
    apply(sched.schedule())  # a's prompt: 2 blocks
    sched.add(b)  # needs 4 blocks; 3 are free
    out = sched.schedule()
    assert not out.prefills and [x.seq.request_id for x in out.decodes] == ["r0"]
    sched.finish(a)
    out = sched.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.prefills] == [("r1", 16)]
    sched.finish(b)
    sched.pool.assert_no_leaks()

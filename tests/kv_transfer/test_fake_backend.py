"""Two KVTransferWorkers on one in-process FakeHub: data, ordering, bounds, deadlines, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ecoserve.kv_transfer import TransferPlan, TransferPlanner, TransferState, TransferUpdate
from ecoserve.kv_transfer.backend import FakeBackend, FakeHub
from ecoserve.kv_transfer.engine import MAX_CHUNKS, KVTransferWorker

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 32
SRC, DST = 0, 1
DONE, QUEUED, IN_FLIGHT = TransferState.DONE, TransferState.QUEUED, TransferState.IN_FLIGHT


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_cache(seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    shape = (NUM_LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=gen)


def make_workers(
    hub: FakeHub | None = None, clock: FakeClock | None = None, **kwargs: object
) -> tuple[FakeHub, KVTransferWorker, KVTransferWorker]:
    hub = hub or FakeHub()
    clock = clock or FakeClock()
    workers = [
        KVTransferWorker(
            FakeBackend(hub, rank), make_cache(rank), rank, clock=clock, **kwargs  # type: ignore[arg-type]
        )
        for rank in (SRC, DST)
    ]
    return hub, workers[0], workers[1]


def random_blocks(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Distinct, shuffled (so non-contiguous) source and destination block ids."""
    (pair,) = allocate_blocks([n], seed)
    return pair


def allocate_blocks(sizes: list[int], seed: int) -> list[tuple[list[int], list[int]]]:
    """(source ids, destination ids) per transfer, disjoint across transfers, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    dst = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    out = []
    for n in sizes:
        out.append((src[:n], dst[:n]))
        src, dst = src[n:], dst[n:]
    return out


def poll_all(*workers: KVTransferWorker, rounds: int = 20) -> list[TransferUpdate]:
    updates: list[TransferUpdate] = []
    for _ in range(rounds):
        for w in workers:
            updates += w.poll()
    return updates


def finish(planner: TransferPlanner, *workers: KVTransferWorker) -> None:
    """Forget every terminal transfer and report it to the planner, as the caller does."""
    for w in workers:
        for plan in planner.pending():
            if plan.request_id in w._transfers:
                assert w.state(plan.request_id).terminal
                w.forget(plan.request_id)
    for plan in planner.pending():
        planner.finish(plan.request_id)


def assert_blocks_equal(src: Tensor, src_ids: list[int], dst: Tensor, dst_ids: list[int]) -> None:
    torch.testing.assert_close(dst[:, :, dst_ids], src[:, :, src_ids], rtol=0, atol=0)


def sent_seqs(hub: FakeHub, kind: str = "send") -> list[int]:
    return [op.tag // MAX_CHUNKS for op in hub.posted if op.kind == kind]


@pytest.mark.parametrize("group_blocks", [64, 1, 3])
def test_destination_blocks_equal_source_blocks(group_blocks: int) -> None:
    hub, sender, receiver = make_workers(group_blocks=group_blocks)
    planner = TransferPlanner()
    dst_before = receiver.kv_cache.clone()
    plan = planner.plan("r1", SRC, DST, num_tokens=13)  # 4 blocks of 4, the last one part-full
    src_ids, dst_ids = random_blocks(4, seed=1)
    # 1. both sides enqueue; nothing moves before a poll
    sender.send(plan, src_ids)
    receiver.recv(plan, dst_ids)
    assert sender.state("r1") is receiver.state("r1") is QUEUED
    # 2. polling both reports IN_FLIGHT, then DONE, on each side
    updates = poll_all(sender, receiver)
    assert [u.state for u in updates if u.request_id == "r1"] == [IN_FLIGHT, IN_FLIGHT, DONE, DONE]
    # 3. the destination blocks hold the source blocks; no other block changed
    assert_blocks_equal(sender.kv_cache, src_ids, receiver.kv_cache, dst_ids)
    others = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
    assert torch.equal(receiver.kv_cache[:, :, others], dst_before[:, :, others])
    expected_messages = 1 + 2 * NUM_LAYERS * math.ceil(4 / group_blocks)  # the header, then K and V by layer and group
    assert len(sent_seqs(hub)) == expected_messages
    # 4. clean up
    finish(planner, sender, receiver)
    for w in (sender, receiver):
        w.assert_no_leaks()
    planner.assert_no_leaks()
    assert hub.num_unmatched() == 0


@pytest.mark.parametrize(
    ("src_ids", "dst_ids"),
    [([2, 3, 4, 5, 6], [20, 21, 22, 23, 24]), ([2, 3, 4, 5, 6], [9, 1, 30, 4, 17]), ([9, 1, 30, 4, 17], [10, 11, 12, 13, 14]),
     ([0, 1, 7, 8, 9], [5, 6, 2, 3, 4])],
    ids=["both-consecutive", "src-consecutive", "dst-consecutive", "runs"],
)
def test_copy_free_and_packed_messages_mix_correctly(src_ids: list[int], dst_ids: list[int]) -> None:
    """Each side independently sends from / receives into the cache when its blocks are
    consecutive, and packs otherwise; any combination moves exactly the same bytes."""
    for group_blocks in (2, 64):
        _, sender, receiver = make_workers(group_blocks=group_blocks)
        before = receiver.kv_cache.clone()
        plan = TransferPlan("r", SRC, DST, seq_no=0, num_tokens=5 * BLOCK_SIZE - 1)
        sender.send(plan, src_ids)
        receiver.recv(plan, dst_ids)
        poll_all(sender, receiver)
        assert receiver.state("r") is DONE
        assert_blocks_equal(sender.kv_cache, src_ids, receiver.kv_cache, dst_ids)
        others = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
        assert torch.equal(receiver.kv_cache[:, :, others], before[:, :, others])
        for w in (sender, receiver):
            assert not w.ops_outstanding("r")
            w.forget("r")
            w.assert_no_leaks()


def test_message_grouping_does_not_change_results() -> None:
    results = []
    for group_blocks in (1, 64):
        _, sender, receiver = make_workers(group_blocks=group_blocks)
        plan = TransferPlan("r", SRC, DST, seq_no=0, num_tokens=30)
        src_ids, dst_ids = random_blocks(8, seed=7)
        sender.send(plan, src_ids)
        receiver.recv(plan, dst_ids)
        poll_all(sender, receiver)
        assert receiver.state("r") is DONE
        results.append(receiver.kv_cache)
        for w in (sender, receiver):
            w.forget("r")
            w.assert_no_leaks()
    assert torch.equal(results[0], results[1])


def test_out_of_order_enqueues_post_in_sequence_order() -> None:
    hub, sender, receiver = make_workers()
    planner = TransferPlanner()
    plans = [planner.plan(f"r{i}", SRC, DST, num_tokens=5 + i) for i in range(5)]
    blocks = allocate_blocks([p.num_blocks(BLOCK_SIZE) for p in plans], seed=10)
    # 1. seq 1 alone is not posted: seq 0 must go first on this side
    sender.send(plans[1], blocks[1][0])
    assert sender.poll() == [] and hub.posted == []
    # 2. the rest arrive out of order on both sides
    for i in (3, 0, 4, 2):
        sender.send(plans[i], blocks[i][0])
    for i in (4, 2, 0, 3, 1):
        receiver.recv(plans[i], blocks[i][1])
    poll_all(sender, receiver)
    # 3. each side posted in seq_no order: a header, then one message per layer and K/V per transfer
    in_order = [seq for seq in range(5) for _ in range(1 + 2 * NUM_LAYERS)]
    assert sent_seqs(hub, "send") == in_order
    assert sent_seqs(hub, "recv") == in_order
    for i, plan in enumerate(plans):
        assert receiver.state(plan.request_id) is DONE
        assert_blocks_equal(sender.kv_cache, blocks[i][0], receiver.kv_cache, blocks[i][1])
    finish(planner, sender, receiver)
    sender.assert_no_leaks()
    receiver.assert_no_leaks()


def test_in_flight_bound_holds() -> None:
    hub, sender, receiver = make_workers(max_in_flight_per_pair=2)
    planner = TransferPlanner(max_in_flight_per_pair=2)
    plans = [planner.plan(f"r{i}", SRC, DST, num_tokens=8) for i in range(5)]
    blocks = allocate_blocks([2] * 5, seed=5)
    for plan, (src_ids, _) in zip(plans, blocks):
        sender.send(plan, src_ids)
    # 1. without a receiver only two transfers are posted
    for _ in range(3):
        sender.poll()
    assert list(dict.fromkeys(sent_seqs(hub))) == [0, 1]
    assert sender.num_in_flight == 2
    assert [sender.state(p.request_id) for p in plans] == [IN_FLIGHT] * 2 + [QUEUED] * 3
    # 2. the receiver drains them; the bound holds at every step on both sides
    for plan, (_, dst_ids) in zip(plans, blocks):
        receiver.recv(plan, dst_ids)
    for _ in range(10):
        for w in (receiver, sender):
            w.poll()
            assert w.num_in_flight <= 2
    assert all(w.state(p.request_id) is DONE for w in (sender, receiver) for p in plans)
    for src_ids, dst_ids in blocks:
        assert_blocks_equal(sender.kv_cache, src_ids, receiver.kv_cache, dst_ids)
    finish(planner, sender, receiver)
    sender.assert_no_leaks()
    receiver.assert_no_leaks()


def test_dropped_pair_times_out_at_the_deadline() -> None:
    clock = FakeClock()
    hub, sender, receiver = make_workers(clock=clock)
    hub.drop(SRC, DST)
    dst_before = receiver.kv_cache.clone()
    plan = TransferPlan("r", SRC, DST, seq_no=0, num_tokens=8)
    src_ids, dst_ids = random_blocks(2, seed=3)
    sender.send(plan, src_ids, deadline_s=5.0)
    receiver.recv(plan, dst_ids, deadline_s=5.0)
    # 1. posted, but nothing on the pair ever completes
    poll_all(sender, receiver)
    assert sender.state("r") is receiver.state("r") is IN_FLIGHT
    # 2. just before the deadline: still in flight
    clock.now += 4.99
    assert sender.poll() == [] and receiver.poll() == []
    # 3. at the deadline both sides time out, with a message
    clock.now += 0.01
    for w in (sender, receiver):
        (update,) = w.poll()
        assert update.state is TransferState.TIMED_OUT
        assert "not done within its 5 s deadline (was in_flight" in update.message
        w.forget("r")
    assert torch.equal(receiver.kv_cache, dst_before)
    # 4. the hung ops stay referenced (they could still write into their buffers)
    with pytest.raises(AssertionError, match="1 in flight"):
        receiver.assert_no_leaks()


def test_receiver_that_timed_out_never_writes_its_blocks() -> None:
    clock = FakeClock()
    _, sender, receiver = make_workers(clock=clock)
    dst_before = receiver.kv_cache.clone()
    plan = TransferPlan("r", SRC, DST, seq_no=0, num_tokens=8)
    src_ids, dst_ids = random_blocks(2, seed=4)
    # 1. the receiver posts and times out before the sender shows up
    receiver.recv(plan, dst_ids, deadline_s=1.0)
    receiver.poll()
    clock.now += 2.0
    assert [u.state for u in receiver.poll()] == [TransferState.TIMED_OUT]
    # 2. the late sender's data lands in the receiver's buffers, never in its blocks
    sender.send(plan, src_ids, deadline_s=10.0)
    poll_all(sender, receiver)
    assert sender.state("r") is DONE
    assert torch.equal(receiver.kv_cache, dst_before)
    for w in (sender, receiver):
        w.forget("r")
        w.assert_no_leaks()


def test_transfer_that_timed_out_while_queued_keeps_the_pair_in_step() -> None:
    clock = FakeClock()
    hub, sender, receiver = make_workers(clock=clock, max_in_flight_per_pair=1)
    planner = TransferPlanner()
    plans = [planner.plan(f"r{i}", SRC, DST, num_tokens=8) for i in range(3)]
    blocks = allocate_blocks([2, 2, 2], seed=20)
    # 1. the sender posts seq 0; seq 1 waits behind it and times out there
    sender.send(plans[0], blocks[0][0], deadline_s=5.0)
    sender.send(plans[1], blocks[1][0], deadline_s=5.0)
    sender.poll()
    clock.now += 6.0
    assert {u.state for u in sender.poll()} == {TransferState.TIMED_OUT}
    # 2. seq 1 is still posted (hollow) when its turn comes, so seq 2 lines up on both sides
    sender.send(plans[2], blocks[2][0], deadline_s=60.0)
    for i in range(3):
        receiver.recv(plans[i], blocks[i][1], deadline_s=60.0)
    poll_all(sender, receiver)
    assert list(dict.fromkeys(sent_seqs(hub))) == [0, 1, 2]
    assert [sender.state(p.request_id) for p in plans] == [TransferState.TIMED_OUT] * 2 + [DONE]
    assert receiver.state("r2") is DONE
    assert_blocks_equal(sender.kv_cache, blocks[2][0], receiver.kv_cache, blocks[2][1])
    # 3. the receiver, its own deadline far off, still refuses the hollow seq 1 (its header says
    #    so): TIMED_OUT, never DONE, so no side ever takes its zeros for KV
    assert receiver.state("r1") is TransferState.TIMED_OUT
    finish(planner, sender, receiver)
    sender.assert_no_leaks()
    receiver.assert_no_leaks()


def test_backend_errors_fail_both_sides() -> None:
    hub, sender, receiver = make_workers()
    hub.fail(SRC, DST, "connection reset by peer")
    plan = TransferPlan("r", SRC, DST, seq_no=0, num_tokens=4)
    sender.send(plan, [3])
    receiver.recv(plan, [5])
    updates = poll_all(sender, receiver)
    failed = [u for u in updates if u.state is TransferState.FAILED]
    assert len(failed) == 2 and all("connection reset by peer" in u.message for u in failed)
    for w in (sender, receiver):
        w.forget("r")
        w.assert_no_leaks()


def test_mismatched_chunking_fails_instead_of_corrupting() -> None:
    hub = FakeHub()
    _, sender, _ = make_workers(hub, group_blocks=1)
    _, _, receiver = make_workers(hub, group_blocks=2)
    before = receiver.kv_cache.clone()
    plan = TransferPlan("r", SRC, DST, seq_no=0, num_tokens=3 * BLOCK_SIZE)
    sender.send(plan, [3, 9, 1])
    receiver.recv(plan, [5, 2, 7])
    updates = poll_all(sender, receiver)
    assert any(u.state is TransferState.FAILED and "size mismatch" in u.message for u in updates)
    # A failed transfer's destination blocks are undefined (the caller frees them); no other
    # block may change.
    others = [b for b in range(NUM_BLOCKS) if b not in (5, 2, 7)]
    assert torch.equal(receiver.kv_cache[:, :, others], before[:, :, others])


def test_invalid_enqueue_arguments_raise() -> None:
    _, sender, receiver = make_workers()
    plan = TransferPlan("r", SRC, DST, seq_no=0, num_tokens=9)  # 3 blocks
    with pytest.raises(ValueError, match="send\\(\\) belongs on rank 0, this worker is rank 1"):
        receiver.send(plan, [0, 1, 2])
    with pytest.raises(ValueError, match="recv\\(\\) belongs on rank 1, this worker is rank 0"):
        sender.recv(plan, [0, 1, 2])
    with pytest.raises(ValueError, match="9 tokens need 3 blocks of 4, got 2 block ids"):
        sender.send(plan, [0, 1])
    with pytest.raises(ValueError, match="block_ids must be distinct and in \\[0, 32\\)"):
        sender.send(plan, [0, 1, 1])
    with pytest.raises(ValueError, match="block_ids must be distinct and in \\[0, 32\\)"):
        sender.send(plan, [0, 1, 32])
    with pytest.raises(ValueError, match="deadline_s must be > 0"):
        sender.send(plan, [0, 1, 2], deadline_s=0)
    sender.send(plan, [0, 1, 2])
    with pytest.raises(ValueError, match="already has a transfer on rank 0"):
        sender.send(plan, [3, 4, 5])
    again = TransferPlan("other", SRC, DST, seq_no=0, num_tokens=9)
    with pytest.raises(ValueError, match="seq_no 0 of pair 0 -> 1 was already enqueued"):
        sender.send(again, [3, 4, 5])
    with pytest.raises(ValueError, match="only transfers in a terminal state"):
        sender.forget("r")
    with pytest.raises(KeyError, match="rank 0 has no transfer for request 'nope'"):
        sender.state("nope")


def test_compat_record_describes_the_cache() -> None:
    _, sender, receiver = make_workers()
    record = sender.compat_record("tiny")
    assert (record.dtype, record.num_layers, record.num_kv_heads, record.head_dim) == (
        "float32", NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM
    )
    assert record.block_size == BLOCK_SIZE
    record.check_compatible(receiver.compat_record("tiny"), "rank 1")


def test_abort_peer_fails_that_peer_s_transfers_and_leaves_the_others_alone() -> None:
    hub, _, receiver = make_workers(max_in_flight_per_pair=1)
    other = KVTransferWorker(FakeBackend(hub, 2), make_cache(2), 2)
    plans = [TransferPlan("r0", SRC, DST, seq_no=0, num_tokens=8), TransferPlan("r1", SRC, DST, seq_no=1, num_tokens=8)]
    kept = TransferPlan("k", 2, DST, seq_no=0, num_tokens=8)
    blocks = allocate_blocks([2, 2, 2], seed=30)
    # 1. r0 is posted (its sender never shows up), r1 queued behind it; k comes from rank 2
    for plan, (_, dst_ids) in zip(plans + [kept], blocks):
        receiver.recv(plan, dst_ids)
    receiver.poll()
    assert receiver.state("r0") is IN_FLIGHT and receiver.state("r1") is QUEUED
    # 2. rank 0 is lost: both its transfers fail with the reason; the queued one is never posted
    receiver.abort_peer(SRC, "peer rank 0 was lost")
    updates = receiver.poll()
    assert {(u.request_id, u.state, u.message) for u in updates if u.request_id != "k"} == {
        ("r0", TransferState.FAILED, "peer rank 0 was lost"), ("r1", TransferState.FAILED, "peer rank 0 was lost")}
    assert not receiver.ops_outstanding("r1") and receiver.ops_outstanding("r0")
    # 3. the dead peer's connection closes: the posted op fails, and its blocks may be freed
    for (src, _, _), queue in hub._recvs.items():
        for handle in queue if src == SRC else ():
            handle.error = "Connection closed by peer"
    receiver.poll()
    assert not receiver.ops_outstanding("r0")
    # 4. the other pair is untouched
    other.send(kept, blocks[2][0])
    poll_all(other, receiver)
    assert receiver.state("k") is DONE and other.state("k") is DONE
    assert_blocks_equal(other.kv_cache, blocks[2][0], receiver.kv_cache, blocks[2][1])
    for rid in ("r0", "r1", "k"):
        receiver.forget(rid)
    other.forget("k")
    receiver.assert_no_leaks()
    other.assert_no_leaks()

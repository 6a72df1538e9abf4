"""Two real processes exchange paged KV blocks over gloo: TorchDistBackend end to end."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
import traceback
from multiprocessing.queues import Queue

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from ecoserve.kv_transfer import TransferPlan, TransferState
from ecoserve.kv_transfer.backend import TorchDistBackend
from ecoserve.kv_transfer.engine import KVTransferWorker

# [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
SHAPE = (4, 2, 48, 4, 2, 8)
TOKENS = [13, 40, 7]  # per transfer; none a multiple of the block size


def make_cache(rank: int) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(rank))


def block_ids(owner: int, incoming: bool) -> list[list[int]]:
    """Shuffled blocks per transfer on rank ``owner``: distinct across transfers, and a rank's
    incoming blocks (the upper half of the pool) never overlap the blocks it sends from."""
    half = SHAPE[2] // 2
    order = torch.randperm(half, generator=torch.Generator().manual_seed(97 * owner + incoming))
    order += half * incoming
    out, start = [], 0
    for n in TOKENS:
        blocks = -(-n // SHAPE[3])
        out.append(order[start : start + blocks].tolist())
        start += blocks
    return out


def run_rank(rank: int, init_method: str, results: Queue[tuple[int, str]]) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
        backend = TorchDistBackend()
        worker = KVTransferWorker(backend, make_cache(rank), rank, max_in_flight_per_pair=2,
                                  group_blocks=1, default_deadline_s=15.0)
        peer = 1 - rank
        # Each rank sends TOKENS to its peer and receives the peer's; enqueued out of order.
        out_plans = [TransferPlan(f"{rank}-{i}", rank, peer, i, n) for i, n in enumerate(TOKENS)]
        in_plans = [TransferPlan(f"{peer}-{i}", peer, rank, i, n) for i, n in enumerate(TOKENS)]
        src_blocks, dst_blocks = block_ids(rank, False), block_ids(rank, True)
        for i in (2, 0, 1):
            worker.send(out_plans[i], src_blocks[i])
            worker.recv(in_plans[i], dst_blocks[i])
        ids = [p.request_id for p in out_plans + in_plans]
        while not all(worker.state(r).terminal for r in ids):
            worker.poll()
            time.sleep(1e-4)
        states = {r: worker.state(r) for r in ids}
        assert all(s is TransferState.DONE for s in states.values()), states
        peer_cache, peer_src = make_cache(peer), block_ids(peer, False)
        for i in range(len(TOKENS)):
            got = worker.kv_cache[:, :, dst_blocks[i]]
            assert torch.equal(got, peer_cache[:, :, peer_src[i]]), f"transfer {i} differs"
        for r in ids:
            worker.forget(r)
        worker.assert_no_leaks()
        dist.barrier()
        backend.close()
        dist.destroy_process_group()
        results.put((rank, ""))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, traceback.format_exc()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two processes that import torch: several seconds, never skipped
def test_two_gloo_ranks_exchange_blocks_both_ways() -> None:
    ctx = mp.get_context("spawn")
    results: Queue[tuple[int, str]] = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=run_rank, args=(r, init_method, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        errors = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert errors == {0: "", 1: ""}, "\n".join(errors.values())
    assert [p.exitcode for p in procs] == [0, 0]

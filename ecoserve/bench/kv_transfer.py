"""`ecoserve bench kv-transfer`: the paged KV transfer against a bare send of the same bytes.

Two gloo ranks on this machine, each with a paged KV pool of SmolLM2-135M's shape (30 layers,
3 KV heads, head dim 64, block size 16; float32 by default, what the CPU path serves). For each
prompt length, iterations alternate the two paths in the same processes:

  A  paged, pool layout: rank 0 ``KVTransferWorker.send`` sends the prompt's blocks to rank 1,
     ``recv`` puts them into its own blocks. Each side's block ids come from a ``BlockPool``
     after churn (allocations of random sizes, every other one freed, then the request's
     blocks), as a worker's pool hands them out: best fit, so the request gets one run of
     consecutive ids when a free run holds it, and its messages go copy-free.
  F  paged, fragmented layout: the same with shuffled ids on both sides (no two consecutive),
     so every message is packed and unpacked: the worst case.
  B  bare: one ``dist.send`` / ``dist.recv`` of a preallocated contiguous tensor of exactly the
     bytes path A moves.

Timing, the same for both: a barrier, then rank 0 starts its clock, runs its side and waits
for a one-element ack that rank 1 sends once its side is complete (for A: every chunk
scattered into the destination blocks; for B: the receive returned). The time is rank 0's,
start to ack, so it includes the receiver's last step and one small message's latency.
The CPU column is the CPU time of both processes (all threads, gloo's included) per transfer.

Packed messages move every byte through two extra memory copies (pack on the sender, unpack
on the receiver); on a 2-core machine those copies, not the transport, set the ratio, which is
why the pool hands out consecutive ids.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time
import traceback
from multiprocessing.queues import Queue
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ecoserve.bench.args import add_kv_transfer_arguments
from ecoserve.report import print_table, write_json
from ecoserve.kv_cache import BlockPool
from ecoserve.kv_transfer.backend import TorchDistBackend
from ecoserve.kv_transfer.engine import KVTransferWorker
from ecoserve.kv_transfer.types import TransferPlan, TransferState

# SmolLM2-135M's KV layout
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 3, 64, 16
BARE_TAG, ACK_TAG = 2**31 - 1, 2**31 - 2  # above any tag the worker uses in this run


def _rank_main(rank: int, init_method: str, settings: dict[str, Any], results: Queue[Any]) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
        results.put((rank, _measure(rank, settings)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - hand the traceback to the parent
        results.put((rank, traceback.format_exc()))


def _measure(rank: int, s: dict[str, Any]) -> dict[int, dict[str, list[float]]]:
    dtype = getattr(torch, s["dtype"])
    max_blocks = math.ceil(max(s["prompt_lens"]) / BLOCK_SIZE)
    gen = torch.Generator().manual_seed(s["seed"] + rank)
    # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; twice the largest
    # prompt, so the random block ids below are scattered over the pool
    shape = (NUM_LAYERS, 2, 2 * max_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    cache = torch.randn(shape, generator=gen).to(dtype)
    backend = TorchDistBackend()
    worker = KVTransferWorker(backend, cache, rank, group_blocks=s["group_blocks"])
    ack = torch.zeros(1)
    times: dict[int, dict[str, list[float]]] = {}
    seq = 0
    for prompt_len in s["prompt_lens"]:
        n = math.ceil(prompt_len / BLOCK_SIZE)
        layouts = {"pool": _pool_ids(n, shape[2], gen), "fragmented": _fragmented_ids(n, shape[2], gen)}
        bare = torch.randn(NUM_LAYERS * 2 * n * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM).to(dtype)
        # per timed iteration: wall (rank 0's clock) and this process's CPU seconds, per path
        got: dict[str, list[float]] = {f"{p}{x}": [] for p in PATHS for x in ("_s", "_cpu_s")}
        for it in range(s["warmup"] + s["repeats"]):
            for path in PATHS:
                cpu = _cpu_s()
                if path == "bare":
                    wall = _bare_once(rank, bare, ack)
                else:
                    plan = TransferPlan(f"{prompt_len}-{path}-{it}", 0, 1, seq, prompt_len)
                    seq += 1
                    wall = _paged_once(worker, plan, layouts[path], ack, s["poll_sleep_us"] * 1e-6)
                    if it == 0:
                        _check_same_blocks(worker.kv_cache, layouts[path])
                if it >= s["warmup"]:
                    got[f"{path}_s"].append(wall)
                    got[f"{path}_cpu_s"].append(_cpu_s() - cpu)
        times[prompt_len] = got
    backend.close()
    return times


PATHS = ("pool", "fragmented", "bare")


def _pool_ids(n: int, num_blocks: int, gen: torch.Generator) -> list[int]:
    """Block ids as a worker's pool hands them out after churn (see the module docstring)."""
    pool = BlockPool(num_blocks, BLOCK_SIZE)
    sizes = [int(x) for x in torch.randint(1, max(2, num_blocks // 16), (8,), generator=gen)]
    held = [pool.allocate(k) for k in sizes if pool.can_allocate(k + n)]
    for blocks in held[::2]:
        pool.free(blocks)
    return pool.allocate(n)


def _fragmented_ids(n: int, num_blocks: int, gen: torch.Generator) -> list[int]:
    """n shuffled ids of which no two are consecutive (every message must be packed)."""
    evens = torch.randperm(num_blocks // 2, generator=gen)[:n] * 2
    return evens.tolist()


def _paged_once(worker: KVTransferWorker, plan: TransferPlan, ids: list[int], ack: Tensor,
                sleep_s: float) -> float:
    dist.barrier()
    start = time.perf_counter()
    (worker.send if worker.rank == 0 else worker.recv)(plan, ids)
    while not worker.state(plan.request_id).terminal:
        worker.poll()
        if sleep_s > 0:
            time.sleep(sleep_s)
    state = worker.state(plan.request_id)
    if state is not TransferState.DONE:
        raise RuntimeError(f"rank {worker.rank}: transfer {plan.request_id} ended {state.value}")
    worker.forget(plan.request_id)
    _ack(worker.rank, ack)
    return time.perf_counter() - start


def _bare_once(rank: int, bare: Tensor, ack: Tensor) -> float:
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        dist.send(bare, 1, tag=BARE_TAG)
    else:
        dist.recv(bare, 0, tag=BARE_TAG)
    _ack(rank, ack)
    return time.perf_counter() - start


def _cpu_s() -> float:
    """CPU seconds used by this process, all threads (gloo's included), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ack(rank: int, ack: Tensor) -> None:
    if rank == 0:
        dist.recv(ack, 1, tag=ACK_TAG)
    else:
        dist.send(ack, 0, tag=ACK_TAG)


def _check_same_blocks(cache: Tensor, ids: list[int]) -> None:
    """Rank 1's destination blocks must hold rank 0's source blocks (compared by checksum)."""
    total = cache[:, :, ids].double().sum().reshape(1)
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(2)]
    dist.all_gather(sums, total)
    if not torch.equal(sums[0], sums[1]):
        raise RuntimeError(f"received blocks differ from the sent ones: checksums {sums}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RankTimes = dict[int, dict[str, list[float]]]  # prompt_len -> series name -> per iteration


def _run_ranks(settings: dict[str, Any]) -> tuple[RankTimes, RankTimes]:
    ctx = mp.get_context("spawn")
    results: Queue[Any] = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        ctx.Process(target=_rank_main, args=(rank, init_method, settings, results))
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=1800) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [v for v in got.values() if isinstance(v, str)]
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return got[0], got[1]


def _stats(wall_s: list[float], cpu_s: list[float], nbytes: int) -> dict[str, float]:
    """Wall time percentiles from rank 0's clock; CPU: both processes, all threads."""
    cuts = statistics.quantiles(wall_s, n=10, method="inclusive") if len(wall_s) > 1 else wall_s * 9
    median = statistics.median(wall_s)
    cpu = statistics.median(cpu_s)
    return {"median_ms": median * 1e3, "p10_ms": cuts[0] * 1e3, "p90_ms": cuts[-1] * 1e3,
            "gbs": nbytes / median / 1e9, "cpu_ms": cpu * 1e3, "cores_busy": cpu / median}


def _transfer_bytes(prompt_len: int, dtype: str) -> int:
    # whole blocks move, so the bytes of ceil(prompt_len / block_size) blocks of every layer
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    blocks = math.ceil(prompt_len / BLOCK_SIZE)
    return NUM_LAYERS * 2 * blocks * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * elem


def run_kv_transfer_benchmark(args: argparse.Namespace) -> int:
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                    block_size=BLOCK_SIZE, backend="gloo", world_size=2, threads_per_rank=1)
    load_before = os.getloadavg()[0]
    rank0, rank1 = _run_ranks(settings)
    load = {"loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    summary: dict[str, Any] = {}
    rows = []
    details = {}
    for prompt_len, t0 in rank0.items():
        t1, nbytes = rank1[prompt_len], _transfer_bytes(prompt_len, args.dtype)
        st = {}
        for path in PATHS:
            cpu = [a + b for a, b in zip(t0[f"{path}_cpu_s"], t1[f"{path}_cpu_s"])]  # both ranks
            st[path] = _stats(t0[f"{path}_s"], cpu, nbytes)
        ratio = st["pool"]["gbs"] / st["bare"]["gbs"]
        ratio_fragmented = st["fragmented"]["gbs"] / st["bare"]["gbs"]
        details[str(prompt_len)] = {
            "bytes": nbytes, "ratio": ratio, "ratio_fragmented": ratio_fragmented, **st, "rank0": t0, "rank1": t1,
        }
        figures = {
            "ratio": ratio, "ratio_fragmented": ratio_fragmented, "bytes": nbytes,
            "paged_gbs": st["pool"]["gbs"], "fragmented_gbs": st["fragmented"]["gbs"], "bare_gbs": st["bare"]["gbs"],
            "paged_ms": st["pool"]["median_ms"], "fragmented_ms": st["fragmented"]["median_ms"],
            "bare_ms": st["bare"]["median_ms"],
        }
        summary.update({f"{key}_{prompt_len}": value for key, value in figures.items()})
        labels = (("pool", "paged, pool layout"), ("fragmented", "paged, fragmented"), ("bare", "bare send/recv"))
        for path, label in labels:
            x = st[path]
            rows.append((
                prompt_len, f"{nbytes / 1e6:.1f}", label, x["median_ms"], x["p10_ms"], x["p90_ms"],
                x["gbs"], x["cpu_ms"], f"{x['gbs'] / st['bare']['gbs']:.2f}" if path != "bare" else "",
            ))
    print_table(
        f"KV transfer, 2 gloo ranks on this machine, {args.dtype}, {args.group_blocks} blocks per message, "
        f"{args.repeats} timed iterations per path",
        ["prompt tokens", "MB", "path", "median ms", "p10 ms", "p90 ms", "GB/s", "CPU ms",
         "paged / bare"],
        rows,
    )
    if args.out:
        # other processes on this machine share its cores: the load average says how many
        write_json(args.out, summary, settings, results=details, load=load)
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`python -m ecoserve.bench.kv_transfer`: the options of `ecoserve bench kv-transfer`."""
    parser = argparse.ArgumentParser(prog="python -m ecoserve.bench.kv_transfer", description="paged KV transfer between two ranks against a bare send/recv")
    add_kv_transfer_arguments(parser)
    # What `ecoserve bench kv-transfer` also sets, so the settings written to JSON are the same.
    parser.set_defaults(command="bench", bench_command="kv-transfer")
    return parser


def main() -> int:
    return run_kv_transfer_benchmark(build_parser().parse_args())


__all__ = ["run_kv_transfer_benchmark"]

if __name__ == "__main__":
    raise SystemExit(main())

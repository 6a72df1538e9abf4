"""Issue 18, defect 2: a burst larger than the prefill pool loses nothing.

- A prefill worker whose queued prompts wait for blocks stalls instead of spinning (in-process
  worker, counted steps: no CPU timing).
- A real sim cluster with a 16-block pool takes a burst of 1,500 requests: every request ends
  once with all its tokens, no transfer fails or times out, no worker dies, and the prefill
  worker never runs a step that finds nothing to do (admission kept within its free blocks).
- A hollow transfer (its sender gave up on it) is refused by a receiver whose clock says it is
  still in time; the request is retried and ends once, with the right tokens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import zmq

from ecoserve import SamplingParams
from ecoserve import protocol as p
from ecoserve.client import AsyncClient
from ecoserve.config import CacheConfig, EngineConfig, ModelConfig, WorkerConfig
from ecoserve.prefill.worker import PrefillWorker

SIM = ("--engine", "sim", "--sim-time-scale", "0.05")


def recv_all(router: zmq.Socket[bytes], timeout_ms: int = 0) -> list[Any]:
    out = []
    while router.poll(timeout_ms):
        out.append(p.decode(router.recv_multipart()[1]))
        timeout_ms = 0
    return out


def test_a_prefill_worker_waiting_for_blocks_stalls_instead_of_spinning(tmp_path: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    engine = EngineConfig(model=ModelConfig(model="tiny-llama", engine="sim", sim_time_scale=0.01), cache=CacheConfig(num_blocks=4))
    worker = PrefillWorker(WorkerConfig(0, 1, "prefill", f"tcp://127.0.0.1:{port}", f"file://{tmp_path / 'rdv'}", engine))
    steps = 0
    real_step = worker.step

    def counted_step() -> None:
        nonlocal steps
        steps += 1
        real_step()

    worker.step = counted_step  # type: ignore[method-assign]
    try:
        # 1. the worker says hello (a heartbeat); four 2-block prompts arrive for a 4-block pool
        worker.turn()
        assert any(isinstance(m, p.Heartbeat) for m in recv_all(router, 5000))
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for i in range(4):
            msg = p.RunPrefill(request_id=f"r{i}", prompt_token_ids=list(range(3, 23)), params=params, decode_locally=False)
            router.send_multipart([b"rank-0", p.encode(msg)])
        # 2. two prefill; their KV is held for transfers, and each PrefillDone says the pool is full
        done: list[p.PrefillDone] = []
        for _ in range(100):
            worker.turn()
            done += [m for m in recv_all(router) if isinstance(m, p.PrefillDone)]
            if len(done) == 2:
                break
        assert [(m.request_id, m.free_blocks) for m in done] == [("r0", 0), ("r1", 0)]
        # 3. r2 and r3 wait for blocks: at most one step finds nothing to do, then the loop blocks
        #    on its socket instead of stepping (the old loop stepped on every turn, 0 ms apart)
        steps_before = steps
        for _ in range(25):
            worker.turn()
        assert steps - steps_before <= 1, f"{steps - steps_before} steps in 25 turns with nothing runnable"
        assert worker.num_empty_steps == 1 and worker.engine.scheduler.waiting
        # 4. r0's KV is released: the freed blocks end the stall and r2 prefills at once
        router.send_multipart([b"rank-0", p.encode(p.AbortWork(request_id="r0"))])
        news: list[Any] = []
        for _ in range(100):
            worker.turn()
            news += recv_all(router)
            if any(isinstance(m, p.PrefillDone) for m in news):
                break
        assert [m.request_id for m in news if isinstance(m, (p.Released, p.PrefillDone))] == ["r0", "r2"]
        # 5. clean up: nothing held
        for rid in ("r1", "r2", "r3"):
            worker.abort(rid)
        assert worker.pool.num_free == 4 and not worker.held and not worker.engine.has_unfinished()
    finally:
        worker.channel.close()
        worker.backend.close()
        dist.destroy_process_group()
        router.close()


async def _burst(addr: str, n: int, params: SamplingParams) -> tuple[list[list[int]], dict[str, float]]:
    async with AsyncClient(addr, heartbeat_timeout=120) as client:
        results = await asyncio.gather(*(client.generate([1, 2, 3, 4, 5], params, timeout=120) for _ in range(n)))
        stats = await client.stats()
        for _ in range(100):  # the last Released / heartbeats settle the block accounting
            if stats["kv_used_blocks"] == 0 and stats["requests_releasing"] == 0:
                break
            await asyncio.sleep(0.2)
            stats = await client.stats()
    return [r.token_ids for r in results], stats


def test_a_burst_past_the_prefill_pool_ends_every_request_once(cluster) -> None:  # type: ignore[no-untyped-def]
    n = 1500  # a 16-block pool holds 16 of these prompts' KV: the burst is ~100 pools deep
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with cluster("tiny-llama", 1, 1, 0, *SIM, "--num-blocks", "16") as addr:
        tokens, stats = asyncio.run(_burst(addr, n, params))
    assert len(tokens) == n and all(t == tokens[0] and len(t) == 4 for t in tokens)
    assert stats["finished"] == n and stats["failed"] == 0 and stats["aborted"] == 0, stats
    assert stats["transfers_done"] == n and stats["transfers_failed"] == 0 and stats["retries"] == 0, stats
    assert stats["workers_lost"] == 0 and stats["kv_used_blocks"] == 0, stats
    # Prompts went to the prefill worker only as its free blocks allowed: none ever waited there
    # for blocks, so it never ran a step that found nothing to do.
    assert stats["rank0.empty_steps"] == 0, {k: v for k, v in stats.items() if k.startswith("rank0.")}


def test_a_hollow_transfer_is_refused_by_a_receiver_still_in_time(cluster, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # The prefill rank starts its first send 1.5 s late, past the 1 s deadline: it times out
    # before it is posted and goes out hollow. The decode rank's clock lags 30 s, so by its own
    # clock the transfer is still in time: only the header tells it the KV is not there.
    monkeypatch.setenv("ECOSERVE_FAULT", "0:delay_send_ms=1500;0:delay_sends=1;1:clock_lag_ms=30000")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def run(addr: str) -> tuple[list[int], list[int], dict[str, float]]:
        async with AsyncClient(addr, heartbeat_timeout=60) as client:
            first = await client.generate([5, 6, 7, 8], params, timeout=60)
            again = await client.generate([5, 6, 7, 8], params, timeout=60)
            return first.token_ids, again.token_ids, await client.stats()

    with cluster("tiny-llama", 1, 1, 0, *SIM, "--transfer-deadline", "1", "--max-retries", "2") as addr:
        first, again, stats = asyncio.run(run(addr))
    assert first == again and len(first) == 8  # the retried request's tokens are the right ones
    assert stats["retries"] == 1 and stats["transfers_failed"] >= 1 and stats["workers_lost"] == 0, stats
    assert stats["finished"] == 2 and stats["failed"] == 0, stats

"""The control channel never drops a frame silently: a worker whose connection is gone is found
out on the next frame sent to it and declared lost, long before its heartbeat timeout.

An in-process Coordinator on real sockets; the worker is a bare DEALER speaking the protocol."""

from __future__ import annotations

import asyncio
import math
import os
import time
from types import SimpleNamespace

import pytest
import zmq

from ecoserve import protocol as p
from ecoserve.config import CoordinatorConfig
from ecoserve.coordinator import server, workers
from ecoserve.coordinator.server import Coordinator
from ecoserve.coordinator.workers import ExpectedRank, worker_identity
from ecoserve.model.registry import prepare_model


def register(rank: int) -> p.RegisterWorker:
    return p.RegisterWorker(
        protocol_version=p.PROTOCOL_VERSION, secret="", rank=rank, role="mixed", pid=os.getpid(), num_blocks=64,
        block_size=16, max_num_batched_tokens=256, model_id="tiny-llama", dtype="float32", num_layers=2,
        num_kv_heads=2, head_dim=16, vocab_size=32000, max_model_len=512,
    )


def test_a_frame_to_a_vanished_worker_declares_it_lost() -> None:
    async def run() -> str:
        coord = Coordinator(
            CoordinatorConfig(port=0, heartbeat_timeout_s=600.0), prepare_model("tiny-llama"), [ExpectedRank(0, "mixed")]
        )
        coord.bind()
        serving = asyncio.create_task(coord.serve())
        ctx = zmq.Context()
        worker = ctx.socket(zmq.DEALER)
        worker.setsockopt(zmq.LINGER, 0)
        worker.setsockopt(zmq.ROUTING_ID, worker_identity(0))
        worker.connect(coord.control_addr)
        try:
            # 1. The worker registers and is told so.
            worker.send(p.encode(register(0)))
            deadline = time.monotonic() + 10
            while not worker.poll(0):
                assert time.monotonic() < deadline, "no RegisterReply"
                await asyncio.sleep(0.01)
            reply = p.decode(worker.recv())
            assert isinstance(reply, p.RegisterReply) and reply.accepted, reply
            # 2. Its connection closes; the next frames sent to it find it gone.
            worker.close()
            deadline = time.monotonic() + 10
            while not coord.is_lost(0):
                assert time.monotonic() < deadline, "a worker whose connection is gone was never declared lost"
                coord._to_worker(0, p.QueryStats())
                await asyncio.sleep(0.05)
            return coord.lifecycle.lost[0]
        finally:
            coord.stop()
            await serving
            coord.close()
            ctx.term()

    reason = asyncio.run(run())
    assert "control connection is gone" in reason, reason


@pytest.mark.parametrize("timeout_s", [1.5, 3.0])  # tests/runtime's stalled-worker and partition tests
def test_a_silent_worker_is_declared_lost_within_the_timeout_plus_one_monitor_period(
    monkeypatch: pytest.MonkeyPatch, timeout_s: float
) -> None:
    """The heartbeat monitor on a fake clock: it checks every min(0.5 s, timeout / 4), and a rank
    that stops speaking is declared lost at the first check past the timeout, so within
    timeout + one period of the last frame it sent; the stats report that silence exactly."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(server, "time", SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(workers, "time", SimpleNamespace(monotonic=lambda: clock.now))
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds
        await real_sleep(0)

    async def run() -> Coordinator:
        coord = Coordinator(CoordinatorConfig(port=0, heartbeat_timeout_s=timeout_s), prepare_model("tiny-llama"),
                            [ExpectedRank(0, "mixed")])
        coord.bind()
        monkeypatch.setattr(server, "asyncio", SimpleNamespace(sleep=fake_sleep))  # the monitor's sleep only
        try:
            assert coord.registry.register(register(0)) is None  # its last frame: at 1000.0
            monitor = asyncio.ensure_future(coord._monitor_loop())
            while not coord.is_lost(0):
                await real_sleep(0)
            monitor.cancel()
            return coord
        finally:
            coord.close()

    coord = asyncio.run(run())
    period = min(0.5, timeout_s / 4)
    assert set(sleeps) == {period}
    # Checks at 1000 + k * period (exact in binary): lost at the first k with k * period > timeout.
    silent = (math.floor(timeout_s / period) + 1) * period
    assert timeout_s < silent <= timeout_s + period
    assert coord.lifecycle.lost[0] == f"no heartbeat for {timeout_s:.1f} s"
    stats = coord.lifecycle.stats()
    assert stats["lost.0.silent_s"] == silent and stats["lost.0.silent_at_previous_check_s"] == silent - period

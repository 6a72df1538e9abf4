"""The control channel never drops a frame silently: a worker whose connection is gone is found
out on the next frame sent to it and declared lost, long before its heartbeat timeout.

An in-process Coordinator on real sockets; the worker is a bare DEALER speaking the protocol."""

from __future__ import annotations

import asyncio
import os
import time

import zmq

from ecoserve import protocol as p
from ecoserve.config import CoordinatorConfig
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

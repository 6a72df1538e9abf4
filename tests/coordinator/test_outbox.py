"""Frames for a client that is not reading wait in order; past the bound only deltas are refused;
a client that is gone is reported, not queued. A real ROUTER/DEALER pair over inproc."""

from __future__ import annotations

import asyncio
from collections import deque

import zmq
import zmq.asyncio

from ecoserve.coordinator.outbox import Outbox, Queued, Sent

ID = b"reader"


def test_a_full_pipe_queues_in_order_bounds_deltas_only_and_flushes_when_read() -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        for sock in (router, dealer):
            sock.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 4)
        dealer.setsockopt(zmq.RCVHWM, 4)
        dealer.setsockopt(zmq.ROUTING_ID, ID)
        router.bind("inproc://outbox")
        dealer.connect("inproc://outbox")
        await asyncio.sleep(0.05)
        outbox = Outbox(router, max_queued_bytes=100)

        # 1. Frames go straight out until the pipe is full; then they queue, in order.
        results = [outbox.send(ID, b"d%03d" % i, delta_of="r") for i in range(40)]
        assert results[0] is Sent.SENT and Sent.QUEUED in results and outbox.pending.is_set()
        # 2. Past 100 queued bytes a delta is refused; a terminal frame is still kept.
        assert Sent.OVER in results
        assert outbox.send(ID, b"end", delta_of=None) is Sent.QUEUED
        assert outbox.queued_bytes() <= 100 + len(b"end")
        # 3. A peer that is not connected is gone: nothing is queued for it.
        assert outbox.send(b"nobody", b"x") is Sent.GONE
        # 4. The reader resumes: everything kept arrives, in order, and the queue empties.
        got = []
        while not got or got[-1] != b"end":
            outbox.flush()
            while await dealer.poll(10):
                got.append(await dealer.recv())
        sent = [b"d%03d" % i for i, r in enumerate(results) if r is not Sent.OVER]
        assert got == sent + [b"end"]
        assert not outbox.queues and not outbox.pending.is_set() and outbox.queued_frames() == 0
        router.close()
        dealer.close()
        ctx.term()

    asyncio.run(run())


def test_dropped_deltas_leave_other_requests_and_terminal_frames() -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        outbox = Outbox(router, max_queued_bytes=1000)
        outbox.queues[ID] = deque()  # a client whose pipe is full
        outbox.bytes[ID] = 0
        for frame, rid in ((b"a1", "a"), (b"b1", "b"), (b"a-end", None), (b"b2", "b")):
            assert outbox.send(ID, frame, delta_of=rid) is Sent.QUEUED
        outbox.drop_deltas(ID, {"b"})
        assert [q.frame for q in outbox.queues[ID]] == [b"a1", b"a-end"] and outbox.bytes[ID] == 7
        router.close()
        ctx.term()

    asyncio.run(run())


def test_offer_never_queues() -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        outbox = Outbox(router, max_queued_bytes=1000)
        assert outbox.offer(b"stranger", b"x") is Sent.GONE
        outbox.queues[ID] = deque([Queued(b"earlier", None)])  # something already waits for it
        outbox.bytes[ID] = 7
        assert outbox.offer(ID, b"later") is Sent.OVER and list(outbox.queues[ID]) == [Queued(b"earlier", None)]
        router.close()
        ctx.term()

    asyncio.run(run())

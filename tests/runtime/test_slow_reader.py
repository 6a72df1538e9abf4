"""A client that stops reading loses nothing: every accepted request ends exactly once.

Real clusters (`ecoserve serve --engine sim` in a subprocess). Frames a slow client cannot take
yet wait for it in order (coordinator/outbox.py); past the bound (ECOSERVE_CLIENT_QUEUE_BYTES)
its requests in flight are aborted, KV freed everywhere, and each ends with one ErrorReply
"client_too_slow" instead of a RequestFinished. Never a hang, never a silent drop.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from ecoserve import RequestError, SamplingParams
from ecoserve import protocol as p
from ecoserve.client import AsyncClient

from tests.runtime.frames import add

SIM = ("--engine", "sim", "--sim-time-scale", "0.2")
N, TOKENS = 200, 300
PARAMS = SamplingParams(max_tokens=TOKENS, ignore_eos=True)


async def settled(client: AsyncClient, timeout: float = 30.0) -> dict[str, float]:
    """Stats once no request is in flight and no KV block is held; fails naming both otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await client.stats()
        if stats["requests_in_flight"] == 0 and stats["kv_used_blocks"] == 0 and stats["requests_releasing"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"still held after {timeout} s: {stats}")
        await asyncio.sleep(0.2)


def test_a_client_that_blocks_its_loop_for_10_s_gets_every_token_and_every_end(cluster) -> None:  # type: ignore[no-untyped-def]
    async def one(client: AsyncClient, i: int) -> tuple[int, int]:
        stream = client.stream([1 + i % 50, 2, 3], PARAMS)
        deltas = 0
        async for delta in stream:
            deltas += len(delta.token_ids)
        assert stream.completion is not None
        return deltas, len(stream.completion.token_ids)

    async def run(addr: str) -> dict[str, float]:
        async with AsyncClient(addr, heartbeat_timeout=120) as client:
            tasks = [asyncio.ensure_future(one(client, i)) for i in range(N)]
            await asyncio.sleep(0.5)  # the requests go out, the tokens start to come
            time.sleep(10)  # the application blocks its event loop: nothing is read
            done, pending = await asyncio.wait(tasks, timeout=60)
            assert not pending, f"{len(pending)} of {N} streams never ended"
            assert [t.result() for t in tasks] == [(TOKENS, TOKENS)] * N
            return await settled(client)

    with cluster("tiny-llama", 1, 1, 0, *SIM) as addr:
        stats = asyncio.run(run(addr))
    assert stats["finished"] >= N and stats["requests_client_too_slow"] == 0, stats


def test_a_reader_past_the_bound_gets_one_client_too_slow_per_request(cluster, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ECOSERVE_CLIENT_QUEUE_BYTES", str(64 * 1024))
    with cluster("tiny-llama", 1, 1, 0, *SIM) as addr:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10)  # little buffered on this side: the server's queue fills
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(addr)
        sock.send(p.encode(p.Hello(p.PROTOCOL_VERSION, "slow")))
        assert isinstance(p.decode(sock.recv()), p.HelloReply)
        for i in range(N):
            sock.send(add(request_id=f"r{i}", prompt_token_ids=[1 + i % 50, 2, 3], max_tokens=TOKENS, stream=True))
        time.sleep(10)  # not reading
        ends: dict[str, list[object]] = {}
        tokens: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(ends) < N or sock.poll(500):  # every end, then make sure no second one follows
            assert time.monotonic() < deadline, f"{N - len(ends)} of {N} requests never ended"
            if not sock.poll(1000):
                continue
            msg = p.decode(sock.recv())
            if isinstance(msg, p.TokenDelta):
                tokens[msg.request_id] = tokens.get(msg.request_id, 0) + len(msg.token_ids)
            elif isinstance(msg, (p.RequestFinished, p.ErrorReply)):
                assert msg.request_id is not None, msg
                ends.setdefault(msg.request_id, []).append(msg)
        assert sorted(ends) == sorted(f"r{i}" for i in range(N))
        assert all(len(e) == 1 for e in ends.values()), {k: e for k, e in ends.items() if len(e) > 1}
        slow = [rid for rid, (e,) in ends.items() if isinstance(e, p.ErrorReply)]
        for rid, (end,) in ends.items():
            if isinstance(end, p.ErrorReply):
                assert end.code == "client_too_slow" and str(64 * 1024) in end.message, end
            else:
                assert isinstance(end, p.RequestFinished) and len(end.token_ids) == TOKENS == tokens[rid], (end, tokens.get(rid))
        assert slow, "the bound was never reached: nothing ended with client_too_slow"
        sock.close()
        ctx.term()

        async def stats() -> dict[str, float]:
            async with AsyncClient(addr) as client:
                return await settled(client)

        values = asyncio.run(stats())
    assert values["requests_client_too_slow"] == len(slow) and values["clients_too_slow"] >= 1, values

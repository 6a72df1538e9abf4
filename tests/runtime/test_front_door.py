"""The front door under hostile input, and cancellation freeing every block everywhere."""

from __future__ import annotations

import asyncio
import random

import msgpack
import zmq

from ecoserve import SamplingParams
from ecoserve import protocol as p
from ecoserve.client import AsyncClient, Client

from tests.runtime.frames import FIELDS, VALID, add


def bad_frames(n: int, seed: int = 0) -> list[list[bytes]]:
    """`n` frames (as multipart messages), every one malformed or invalid, of many kinds."""
    rng = random.Random(seed)
    invalid_values = [
        dict(prompt="", prompt_token_ids=None), dict(prompt="hi"), dict(prompt_token_ids=None),
        dict(prompt_token_ids=[]), dict(prompt_token_ids=[10**9]), dict(prompt_token_ids=[-1]),
        dict(max_tokens=0), dict(max_tokens=-5), dict(max_tokens=10**9), dict(temperature=-1.0),
        dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(slo_ttft_ms=-1.0), dict(slo_tpot_ms=0.0),
        dict(request_id=""), dict(request_id="x" * 500), dict(stop_token_ids=[10**9]),
        dict(prompt_token_ids=[5] * 100_000), dict(prompt="word " * 2_000_000, prompt_token_ids=None),
    ]
    wrong_shapes = [
        msgpack.packb(x) for x in ({"a": 1}, 1, None, [], ["AddRequest"], ["AddRequest", 1], [1, {}], "AddRequest")
    ]
    kinds = [
        lambda: [rng.randbytes(rng.randrange(0, 200))],
        lambda: [rng.choice(wrong_shapes)],
        lambda: [msgpack.packb([rng.choice(["Pickle", "Shutdown", "RegisterWorker", "RunPrefill", "x" * 70]), {}])],
        lambda: [add(**rng.choice(invalid_values))],
        lambda: [add(**{rng.choice(FIELDS): rng.choice([[None], {"k": 1}, b"raw bytes", float("nan")])})],
        lambda: [msgpack.packb(["AddRequest", dict(rng.sample(sorted(VALID.items()), rng.randrange(len(VALID))))])],
        lambda: [msgpack.packb(["AbortRequest", {"request_id": 5}])],
        lambda: [b"a", b"b"],
    ]
    frames = [rng.choice(kinds)() for _ in range(n - 2)]
    frames += [[b"\x93" + b"\x00" * (p.MAX_FRAME_BYTES + 10)], [msgpack.packb(["GetStats", {"extra": 1}])]]
    rng.shuffle(frames)
    return frames


def test_a_thousand_bad_frames_each_get_an_error_and_service_goes_on(cluster) -> None:  # type: ignore[no-untyped-def]
    with cluster("tiny-llama", 1, 1, 0) as addr:
        with Client(addr) as client:
            pids_before = {k: v for k, v in client.stats().items() if k.endswith(".pid")}
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(addr)
        sock.send(p.encode(p.Hello(p.PROTOCOL_VERSION, "fuzz")))
        assert isinstance(p.decode(sock.recv()), p.HelloReply)
        frames = bad_frames(1000)
        replies = []
        for parts in frames:
            sock.send_multipart(parts)
            assert sock.poll(30_000), f"no reply to a bad frame {parts[0][:40]!r}"
            replies.append(p.decode(sock.recv()))
        assert all(isinstance(r, p.ErrorReply) for r in replies), [r for r in replies if not isinstance(r, p.ErrorReply)][:3]
        assert {r.code for r in replies} <= {"bad_frame", "bad_request"}
        assert all(r.message for r in replies)
        messages = " ".join(r.message for r in replies)
        for expected in ("exceeds the maximum", "unknown message type", "not valid MessagePack", "exactly one of prompt",
                         "max_tokens must be", "prompt token ids must be in", "exceeds the model's context"):
            assert expected in messages, f"no error said {expected!r}"
        sock.close()
        ctx.term()
        with Client(addr) as client:
            done = client.generate([1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
            assert len(done.token_ids) == 5 and done.finish_reason == "length"
            stats = client.stats()
        assert {k: v for k, v in stats.items() if k.endswith(".pid")} == pids_before, "a worker was restarted"
        assert stats["workers_alive"] == 2 and stats["finished"] == 1


def test_cancelled_streams_free_every_block_on_every_worker(cluster) -> None:  # type: ignore[no-untyped-def]
    """24 streams cancelled after 0-5 deltas (so in every lifecycle state), 8 aborted by id, 4
    left to finish; then no block is used or reserved anywhere and nothing awaits release."""

    async def run(addr: str) -> dict[str, float]:
        async with await AsyncClient.connect(addr, timeout=30) as client:
            params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
            rng = random.Random(1)
            prompts = [[rng.randrange(1, 1000) for _ in range(rng.randrange(5, 90))] for _ in range(36)]

            async def cancel_after(prompt: list[int], n: int) -> int:
                seen = 0
                stream = client.stream(prompt, params)
                async for _ in stream:
                    seen += 1
                    if seen >= n:
                        break
                await stream.aclose()
                return seen

            async def abort_by_id(prompt: list[int], delay: float) -> str:
                stream = client.stream(prompt, params)

                async def consume() -> str:
                    async for _ in stream:
                        pass
                    assert stream.completion is not None
                    return stream.completion.finish_reason

                task = asyncio.ensure_future(consume())
                await asyncio.sleep(delay)
                await client.abort(stream.request_id)  # False when it is not (or no longer) in flight
                return await task

            short = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            results = await asyncio.gather(
                *(cancel_after(pr, i % 6) for i, pr in enumerate(prompts[:24])),
                *(abort_by_id(pr, 0.05 * (i + 1)) for i, pr in enumerate(prompts[24:32])),
                *(client.generate(pr, short) for pr in prompts[32:]),
            )
            assert all(r == "abort" or r == "length" for r in results[24:32])
            by_id = sum(r == "abort" for r in results[24:32])  # an abort that came after the end is a no-op
            for _ in range(100):
                stats = await client.stats()
                if stats["requests_releasing"] == 0 and stats["kv_used_blocks"] == 0:
                    break
                await asyncio.sleep(0.1)
            return {**stats, "aborted_by_id": by_id}

    with cluster("tiny-llama", 1, 1, 0, "--num-blocks", "48", "--max-num-batched-tokens", "128") as addr:
        stats = asyncio.run(run(addr))
    # Every request ends once: the 24 cancelled streams and the by-id aborts that landed are
    # aborted, the rest finish, and none fails.
    assert stats["aborted"] == 24 + stats["aborted_by_id"], stats
    assert stats["finished"] == 4 + 8 - stats["aborted_by_id"], stats
    assert stats["failed"] == 0 and stats["aborted"] + stats["finished"] == 36, stats
    assert stats["requests_in_flight"] == 0 and stats["requests_releasing"] == 0
    assert stats["reserved_blocks"] == 0 and stats["transfers_in_flight"] == 0
    for rank in (0, 1):
        assert stats[f"rank{rank}.used_blocks"] == 0, f"rank {rank} still holds blocks: {stats}"
        assert stats[f"rank{rank}.transfers_in_flight"] == 0
    assert stats["kv_used_blocks"] == 0

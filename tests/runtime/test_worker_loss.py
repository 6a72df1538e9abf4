"""Decode workers lost on the real model (tiny-llama, 1 prefill + 2 decode), in two steps.

1. Decode rank 1 dies (SIGKILL, injected with ECOSERVE_FAULT) after 30 tokens: its requests
   are prefilled again over prompt + the tokens already streamed, their KV moves to rank 2 and
   they finish there with exactly LLM.generate's greedy tokens, streamed with no duplicate and
   no gap.
2. Rank 2 is killed mid-generation: no decode worker is left, so its requests fail with a clear
   error naming both lost ranks (no hang), the prefill worker frees what it held, the
   coordinator keeps answering and refuses new requests with the reason, and the server still
   shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from ecoserve import LLM, RequestError, SamplingParams
from ecoserve.client import AsyncClient


def test_lost_decode_workers_resume_elsewhere_then_fail_clearly_when_none_is_left(  # type: ignore[no-untyped-def]
    cluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ECOSERVE_FAULT", "1:die_after_tokens=30")
    prompts = [[(31 * i + 17 * k) % 5000 + 3 for k in range(10 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reference = [o.token_ids for o in LLM(model="tiny-llama", dtype="float32", device="cpu").generate(
        prompts, params, use_tqdm=False)]

    async def run(addr: str) -> tuple[list[list[tuple[int, list[int]]]], list, list, dict[str, float], RequestError]:
        async with await AsyncClient.connect(addr, timeout=30) as client:
            # 1. Rank 1 dies after 30 tokens; everything finishes on rank 2.
            async def deltas(prompt: list[int]) -> list[tuple[int, list[int]]]:
                return [(d.index, d.token_ids) async for d in client.stream(prompt, params)]

            streamed = list(await asyncio.gather(*(deltas(q) for q in prompts)))
            done = list(await asyncio.gather(*(client.generate(q, params) for q in prompts[:2])))
            # 2. Rank 2 is killed while six long requests decode on it.
            pid = int((await client.stats())["rank2.pid"])
            long = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
            started = asyncio.Event()

            async def consume(prompt: list[int]) -> BaseException | None:
                try:
                    async for delta in client.stream(prompt, long):
                        if delta.index >= 3:
                            started.set()
                except RequestError as exc:
                    return exc
                return None

            tasks = [asyncio.ensure_future(consume([i + 1] * (20 + 7 * i))) for i in range(6)]
            await asyncio.wait_for(started.wait(), 60)
            os.kill(pid, signal.SIGKILL)
            errors = list(await asyncio.wait_for(asyncio.gather(*tasks), 60))
            for _ in range(100):
                stats = await client.stats()
                if stats.get("rank0.used_blocks", 1) == 0 and stats["requests_releasing"] == 0:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(RequestError) as refused:
                await client.generate([1, 2, 3], SamplingParams(max_tokens=2))
            return streamed, done, errors, stats, refused.value

    with cluster("tiny-llama", 1, 2, 0, "--num-blocks", "512") as addr:
        streamed, done, errors, stats, refused = asyncio.run(run(addr))
    for deltas, ref in zip(streamed, reference):
        assert [i for i, _ in deltas] == list(range(len(ref))), "one token per delta, indices with no duplicate or gap"
        assert [t for _, toks in deltas for t in toks] == ref
    assert [d.token_ids for d in done] == reference[:2], "the survivor serves after the loss"
    assert all(isinstance(e, RequestError) and e.code == "failed" for e in errors), errors
    assert all("worker rank 2 (decode) was lost" in str(e) and "worker rank 1 (decode) was lost" in str(e) for e in errors)
    assert stats["workers_alive"] == 1 and stats["workers_lost"] == 2 and stats["retries"] >= 1
    assert stats["rank0.used_blocks"] == 0 and stats["requests_in_flight"] == 0 and stats["reserved_blocks"] == 0
    assert refused.code == "failed" and "no live worker can serve requests" in str(refused)

"""A decode worker killed mid-generation: its requests fail with a clear error (no hang), the
coordinator keeps answering, the prefill worker frees what it held, and the server still
shuts down cleanly. (Retrying elsewhere is the reliability issue's work.)"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from ecoserve import RequestError, SamplingParams
from ecoserve.client import AsyncClient


def test_killed_decode_worker_fails_its_requests_and_frees_the_prefill_side(cluster) -> None:  # type: ignore[no-untyped-def]
    async def run(addr: str) -> tuple[list[BaseException | None], dict[str, float], RequestError]:
        async with await AsyncClient.connect(addr, timeout=30) as client:
            pid = int((await client.stats())["rank1.pid"])
            params = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
            started = asyncio.Event()

            async def consume(prompt: list[int]) -> BaseException | None:
                try:
                    async for delta in client.stream(prompt, params):
                        if delta.index >= 3:
                            started.set()
                except RequestError as exc:
                    return exc
                return None

            tasks = [asyncio.ensure_future(consume([i + 1] * (20 + 7 * i))) for i in range(6)]
            await asyncio.wait_for(started.wait(), 60)
            os.kill(pid, signal.SIGKILL)
            errors = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            for _ in range(100):
                stats = await client.stats()
                if stats.get("rank0.used_blocks", 1) == 0 and stats["requests_releasing"] == 0:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(RequestError) as refused:
                await client.generate([1, 2, 3], SamplingParams(max_tokens=2))
            return errors, stats, refused.value

    with cluster("tiny-llama", 1, 1, 0, "--num-blocks", "512") as addr:
        errors, stats, refused = asyncio.run(run(addr))
    assert all(isinstance(e, RequestError) and e.code == "failed" for e in errors), errors
    assert any("worker rank 1 (decode) was lost" in str(e) for e in errors)
    assert stats["workers_alive"] == 1 and stats["workers_lost"] == 1
    assert stats["rank0.used_blocks"] == 0 and stats["requests_in_flight"] == 0 and stats["reserved_blocks"] == 0
    assert refused.code == "failed" and "no live worker can serve requests" in str(refused)

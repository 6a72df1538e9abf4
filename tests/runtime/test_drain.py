"""SIGTERM drains: new requests are refused with "shutting_down", in-flight ones finish, and
the server exits 0 with no worker left (checked by the cluster fixture)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from ecoserve import RequestError, SamplingParams
from ecoserve.client import AsyncClient, Completion
from tests.runtime.test_faults import until


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(cluster) -> None:  # type: ignore[no-untyped-def]
    async def run(addr: str) -> tuple[list[Completion], RequestError]:
        async with await AsyncClient.connect(addr, timeout=30) as client:
            pid = int((await client.stats())["coordinator_pid"])
            params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
            first = asyncio.Event()

            async def consume(prompt: list[int]) -> Completion:
                stream = client.stream(prompt, params)
                async for _ in stream:
                    first.set()
                assert stream.completion is not None
                return stream.completion

            tasks = [asyncio.ensure_future(consume([i + 1] * (10 + i))) for i in range(3)]
            await asyncio.wait_for(first.wait(), 60)
            os.kill(pid, signal.SIGTERM)
            await until(client, lambda s: s["draining"], "the coordinator draining after SIGTERM", timeout=10)
            with pytest.raises(RequestError) as refused:
                await client.generate([1, 2], SamplingParams(max_tokens=2))
            return list(await asyncio.gather(*tasks)), refused.value

    with cluster("tiny-llama", 1, 1, 0) as addr:
        done, refused = asyncio.run(run(addr))
    assert [len(d.token_ids) for d in done] == [150, 150, 150]
    assert refused.code == "shutting_down"

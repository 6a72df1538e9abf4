"""`ecoserve serve` on CUDA with the defaults (no --dtype or --device: bfloat16, the Triton
kernels, an NCCL world between the ranks) serves the same greedy tokens as the offline engine
on the same GPU (marker `gpu`: skipped on machines without CUDA, see tests/conftest.py).

Requests are sent one at a time first: each then runs alone, in steps shaped exactly as the
offline engine's run of it alone (one prefill chunk, then decodes of batch 1), so the bf16
arithmetic is the same and the tokens must be equal, not close. The same requests are then
sent all at once: batched with each other, bf16 matrix products are not bitwise
batch-invariant (the GEMM picks its tiling by shape), so a near-tie may go the other way; that
phase checks that every request is served in full and every block and reservation comes back.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from ecoserve import LLM, SamplingParams
from ecoserve.client import AsyncClient, Client
from tests.runtime.test_serve_equivalence import MAX_TOKENS, PROMPT_LENS, prompts

pytestmark = pytest.mark.gpu


def offline_cuda_tokens(model: str) -> list[list[int]]:
    """The offline engine's greedy tokens with its CUDA defaults, one request at a time."""
    llm = LLM(model=model)
    assert llm.engine.device == "cuda" and llm.engine.dtype is torch.bfloat16 and llm.engine.runner.use_kernels
    out = [
        llm.generate([p], SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))[0].token_ids
        for p, m in zip(prompts(model), MAX_TOKENS)
    ]
    del llm
    gc.collect()
    torch.cuda.empty_cache()  # the workers start on this GPU next
    return out


def serve_and_compare(addr: str, model: str, expected: list[list[int]]) -> dict[str, float]:
    """1. one at a time: exactly the offline tokens; 2. all at once: all served in full;
    3. nothing left held. Returns the final stats."""
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    with Client(addr, timeout=60) as client:
        for i, (prompt, want) in enumerate(zip(prompts(model), expected)):
            done = client.generate(prompt, params[i], timeout=300)
            assert done.token_ids == want, f"request {i} ({PROMPT_LENS[i]}-token prompt) differs from the offline engine"
    assert len({t for w in expected for t in w}) > 40, "degenerate reference outputs would prove little"

    async def all_at_once() -> dict[str, float]:
        async with await AsyncClient.connect(addr, timeout=60) as client:
            done = await asyncio.gather(*(client.generate(p, sp, timeout=300) for p, sp in zip(prompts(model), params)))
            for d, m, n in zip(done, MAX_TOKENS, PROMPT_LENS):
                assert d.finish_reason == "length" and len(d.token_ids) == m and d.num_prompt_tokens == n
            return await client.stats()

    stats = asyncio.run(all_at_once())
    assert stats["finished"] == 2 * len(PROMPT_LENS) and stats["failed"] == 0
    assert stats["kv_used_blocks"] == 0 and stats["reserved_blocks"] == 0, "blocks left allocated after every request ended"
    return stats


@pytest.mark.parametrize("model", ["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_a_mixed_worker_on_cuda_serves_the_offline_engine_s_tokens(cluster, model: str) -> None:  # type: ignore[no-untyped-def]
    expected = offline_cuda_tokens(model)
    with cluster(model, 0, 0, 1, "--policy", "vllm", "--num-blocks", "256", dtype="auto", device="auto") as addr:
        serve_and_compare(addr, model, expected)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,  # without CUDA the gpu marker's skip says why
    reason=f"NCCL KV transfer needs two GPUs, one per rank (NCCL refuses two ranks of one world on one device); "
    f"this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 0}",
)
def test_nccl_prefill_to_decode_kv_transfer_serves_the_offline_engine_s_tokens(cluster) -> None:  # type: ignore[no-untyped-def]
    """1 prefill + 1 decode rank, each on its own GPU, KV moved over NCCL: every request's KV
    crosses once (unless the prefill's token was its last), and the decode rank continues exactly where the offline engine would."""
    model = "tiny-llama"
    expected = offline_cuda_tokens(model)
    with cluster(model, 1, 1, 0, "--num-blocks", "256", dtype="auto", device="auto") as addr:
        stats = serve_and_compare(addr, model, expected)
    # A request of max_tokens 1 ends with the prefill's token: it moves no KV.
    assert stats["transfers_done"] == 2 * sum(m > 1 for m in MAX_TOKENS) and stats["transfers_failed"] == 0

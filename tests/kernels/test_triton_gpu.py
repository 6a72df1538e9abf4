"""The Triton kernels compiled for CUDA against the references on serving-sized shapes."""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor

from ecoserve.kernels import ops, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device: torch.cuda.is_available() is False",
    ),
]

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAN = float("nan")


def make_paged_batch(
    gen: torch.Generator,
    batch: int,
    max_len: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(k_cache, v_cache, block_tables, context_lens) on CUDA; lengths in [1, max_len]."""
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lens[0] = max_len
    needed = (lens + block_size - 1) // block_size
    num_blocks = int(needed.sum()) + 8
    width = int(needed.max())
    table = torch.full((batch, width), -1, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen)
    starts = needed.cumsum(0) - needed
    for seq in range(batch):
        table[seq, : needed[seq]] = order[starts[seq] : starts[seq] + needed[seq]].int()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device="cuda", dtype=dtype)
    v_cache = torch.randn(shape, generator=gen).to(device="cuda", dtype=dtype)
    return k_cache, v_cache, table.cuda(), lens.int().cuda()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("block_size", "max_len"), [(16, 2048), (32, 1000)])
def test_paged_decode_attention_on_cuda(dtype: torch.dtype, block_size: int, max_len: int) -> None:
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads, group, head_dim = 8, 4, 128
    k_cache, v_cache, table, lens = make_paged_batch(
        gen, 64, max_len, block_size, num_kv_heads, head_dim, dtype
    )
    query = torch.randn(64, num_kv_heads * group, head_dim, generator=gen).to(
        device="cuda", dtype=dtype
    )
    out = torch.full_like(query, NAN)
    scale = head_dim**-0.5

    ops.paged_decode_attention(
        query, k_cache, v_cache, table, lens, scale, out=out, backend="triton"
    )

    expected = reference.paged_decode_attention_ref(query, k_cache, v_cache, table, lens, scale)
    torch.testing.assert_close(
        out, expected, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"seed {seed}: {m}"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_on_cuda(dtype: torch.dtype) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = 512, 16, 8, 128
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, NAN, dtype=dtype, device="cuda") for _ in range(4)]
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:4096]
    slots[::7] = -1
    key = torch.randn(4096, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    value = torch.randn(4096, num_kv_heads, head_dim, device="cuda", dtype=dtype)

    ops.write_kv(key, value, caches[0], caches[1], slots, backend="triton")

    reference.write_kv_ref(key, value, caches[2], caches[3], slots)
    for got, expected in zip(caches[:2], caches[2:]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_gather_and_scatter_on_cuda() -> None:
    # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_cache = torch.randn(24, 2, 256, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    block_ids = torch.randperm(256, device="cuda")[:40]
    buffer = torch.full((24, 2, 40, 16, 8, 128), NAN, device="cuda", dtype=torch.bfloat16)

    ops.gather_blocks(kv_cache, block_ids, out=buffer, backend="triton")

    assert torch.equal(buffer, reference.gather_blocks_ref(kv_cache, block_ids))
    target = torch.full_like(kv_cache, NAN)
    expected = target.clone()
    ops.scatter_blocks(buffer, target, block_ids, backend="triton")
    reference.scatter_blocks_ref(buffer, expected, block_ids)
    torch.testing.assert_close(target, expected, rtol=0, atol=0, equal_nan=True)

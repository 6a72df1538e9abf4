"""The CPU C kernel (built here with the system compiler, in seconds) against its pure-torch
reference: ragged contexts, GQA groups, padded table entries, float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from ecoserve.kernels import cpu
from ecoserve.kernels.reference import paged_decode_attention_ref

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")


def make_case(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, lens: list[int], block_size: int = 16,
              head_dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lens), num_q_heads, head_dim, generator=g).to(dtype)
    width = max(-(-n // block_size) for n in lens) + 1  # one spare column of padding
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[i, :nb] = perm[used : used + nb].int()  # scattered blocks, not consecutive
        used += nb
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(9, 3), (4, 4), (8, 1)])
def test_paged_decode_attention_matches_reference(dtype: torch.dtype, atol: float, num_q_heads: int, num_kv_heads: int) -> None:
    q, k, v, tables, lens = make_case(dtype, num_q_heads, num_kv_heads, [1, 15, 16, 17, 130, 333])
    got = cpu.paged_decode_attention(q, k, v, tables, lens, 0.125)
    want = paged_decode_attention_ref(q, k, v, tables, lens, 0.125)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def test_wrapper_refuses_bad_arguments() -> None:
    q, k, v, tables, lens = make_case(torch.float32, 9, 3, [5, 40])
    with pytest.raises(ValueError, match="must be int32"):
        cpu.paged_decode_attention(q, k, v, tables.long(), lens, 0.125)
    with pytest.raises(ValueError, match="dtypes must be one of"):
        cpu.paged_decode_attention(q, k.bfloat16(), v, tables, lens, 0.125)
    with pytest.raises(ValueError, match="must be contiguous"):
        cpu.paged_decode_attention(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, tables, lens, 0.125)

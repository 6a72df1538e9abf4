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
    num_blocks = sum(-(-n // block_size) for n in lens) + 8
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


# The kernel has three code paths by head size: 64 and 128 (unrolled 16-lane vectors), other
# multiples of 16 (the same vectors, a run-time count) and the rest (element by element); and it
# takes sixteen tokens at a time inside a block, so blocks of 8, 16 and 32 tokens are all cut
# differently.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 8), (64, 32), (128, 16), (80, 16), (24, 16), (24, 32)])
def test_every_head_size_and_block_size(dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    lens = [1, 7, 8, 15, 16, 17, 31, 33, 64, 200]
    q, k, v, tables, lens_t = make_case(dtype, 8, 2, lens, block_size=block_size, head_dim=head_dim, seed=head_dim)
    got = cpu.paged_decode_attention(q, k, v, tables, lens_t, head_dim**-0.5)
    want = paged_decode_attention_ref(q, k, v, tables, lens_t, head_dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-6 if dtype == torch.float32 else 1e-2, rtol=0)


def has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not has_avx512_bf16(), reason="this CPU has no AVX512-BF16: the portable path is the one built")
@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 16), (128, 32)])
def test_the_portable_bf16_path_where_the_cpu_has_a_bf16_dot_product(head_dim: int, block_size: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Where the CPU has AVX512-BF16 the engine's build scores bf16 with its dot-product
    instruction; the path every other CPU takes (K widened to float32) is built here without it."""
    portable = cpu.build(cpu.CFLAGS + ("-mno-avx512bf16",))
    assert portable is not None
    monkeypatch.setattr(cpu, "_library", lambda: portable)
    lens = [1, 15, 16, 17, 130, 333]
    q, k, v, tables, lens_t = make_case(torch.bfloat16, 8, 2, lens, block_size=block_size, head_dim=head_dim)
    got = cpu.paged_decode_attention(q, k, v, tables, lens_t, head_dim**-0.5)
    want = paged_decode_attention_ref(q, k, v, tables, lens_t, head_dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=0)


def test_a_long_context_with_one_dominant_token() -> None:
    """Scores far apart (the softmax's exponential clamps below exp(-87)): the weight goes to the
    one token that dominates, as in the reference."""
    q, k, v, tables, lens = make_case(torch.float32, 4, 4, [1000, 3])
    k[tables[0, 3], 5] = q[0] * 40.0  # token 53 of sequence 0: a score thousands above the rest
    got = cpu.paged_decode_attention(q, k, v, tables, lens, 1.0)
    want = paged_decode_attention_ref(q, k, v, tables, lens, 1.0)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    torch.testing.assert_close(got[0], v[tables[0, 3], 5], atol=2e-6, rtol=0)


def test_a_nan_score_poisons_only_its_own_row() -> None:
    q, k, v, tables, lens = make_case(torch.float32, 9, 3, [20, 20])
    q[0, 4, 0] = float("nan")  # query head 4 of sequence 0 (KV head 1)
    got = cpu.paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.isnan(got[0, 4]).all()
    want = paged_decode_attention_ref(q, k, v, tables, lens, 0.125)
    keep = torch.ones_like(got, dtype=torch.bool)
    keep[0, 4] = False
    torch.testing.assert_close(got[keep], want[keep], atol=2e-6, rtol=0)


def test_wrapper_refuses_bad_arguments() -> None:
    q, k, v, tables, lens = make_case(torch.float32, 9, 3, [5, 40])
    with pytest.raises(ValueError, match="must be int32"):
        cpu.paged_decode_attention(q, k, v, tables.long(), lens, 0.125)
    with pytest.raises(ValueError, match="dtypes must be one of"):
        cpu.paged_decode_attention(q, k.bfloat16(), v, tables, lens, 0.125)
    with pytest.raises(ValueError, match="must be contiguous"):
        cpu.paged_decode_attention(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, tables, lens, 0.125)
    q, k, v, tables, lens = make_case(torch.float32, 2, 1, [5], head_dim=528)
    with pytest.raises(ValueError, match="head_dim 528 is beyond its limit of 512"):
        cpu.paged_decode_attention(q, k, v, tables, lens, 0.125)

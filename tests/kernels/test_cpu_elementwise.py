"""The bfloat16 elementwise C kernels against the model's own torch code they replace.

RoPE rounds exactly where the torch ops round, so it must match bit for bit. RMSNorm sums its
squares in another order and SiLU uses another exponential: both may differ from torch by one
bfloat16 step in a few elements, and nowhere by more."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecoserve.kernels import cpu
from ecoserve.model.llama import RMSNorm
from ecoserve.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")


def assert_within_one_bf16_step(got: torch.Tensor, want: torch.Tensor, max_share_off: float) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    g, w = got.float(), want.float()
    step = w.abs().clamp_min(1e-30) * 2.0**-7  # one bf16 ulp is 2^-7 to 2^-8 of the value
    off = g != w
    assert bool(((g - w).abs() <= step).all()), f"largest gap {(g - w).abs().max().item()}"
    assert off.float().mean().item() <= max_share_off, f"{off.float().mean().item():.2%} of elements differ"


@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (7, 576), (64, 576), (3, 40)])
def test_rms_norm(rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(dim + rows)
    norm = RMSNorm(dim, 1e-5).bfloat16()
    norm.weight.data = (torch.rand(dim, generator=g) * 2).bfloat16()
    x = (torch.randn(rows, dim, generator=g) * 3).bfloat16()
    assert_within_one_bf16_step(cpu.rms_norm_bf16(x, norm.weight.data, 1e-5), norm.forward(x), 0.02)


@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (64, 1536), (5, 40)])
def test_silu_mul(rows: int, inter: int) -> None:
    g = torch.Generator().manual_seed(inter + rows)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).bfloat16()
    gate_up[0, :6] = torch.tensor([-100.0, -90.0, 0.0, 90.0, 100.0, float("nan")]).bfloat16()  # the exp's clamps and NaN
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu.silu_mul_bf16(gate_up)
    assert torch.isnan(got[0, 5]) and torch.isnan(want[0, 5])
    got[0, 5] = want[0, 5] = 0
    assert_within_one_bf16_step(got, want, 0.02)


@pytest.mark.parametrize(("heads", "head_dim"), [(12, 64), (3, 128), (2, 40)])
def test_rope_in_place_matches_apply_rope_exactly(heads: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(heads * head_dim)
    tokens, extra = 9, 3 * head_dim  # the row also holds v, which must be left alone
    qkv = (torch.randn(tokens, heads * head_dim + extra, generator=g) * 2).bfloat16()
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, 10000.0, None), 4096)
    positions = torch.tensor([0, 1, 2, 100, 101, 2000, 4095, 7, 7])
    c, s = cos[positions].bfloat16(), sin[positions].bfloat16()
    want = apply_rope(qkv[:, : heads * head_dim].view(tokens, heads, head_dim), c, s).reshape(tokens, -1)
    v_before = qkv[:, heads * head_dim :].clone()
    cpu.rope_bf16_(qkv, heads, head_dim, c, s)
    assert torch.equal(qkv[:, : heads * head_dim], want)
    assert torch.equal(qkv[:, heads * head_dim :], v_before)


def test_wrappers_refuse_what_they_cannot_run() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="contiguous bfloat16 CPU tensors: x is torch.float32"):
        cpu.rms_norm_bf16(x, torch.ones(64).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match=r"weight \[dim\]"):
        cpu.rms_norm_bf16(x.bfloat16(), torch.ones(63).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match=r"\[rows, 2 \* inter\]"):
        cpu.silu_mul_bf16(torch.ones(4, 63).bfloat16())
    c = torch.ones(4, 64).bfloat16()
    with pytest.raises(ValueError, match="do not fit a row"):
        cpu.rope_bf16_(x.bfloat16(), 2, 64, c, c)
    with pytest.raises(ValueError, match="unit column stride"):
        cpu.rope_bf16_(torch.ones(64, 4).bfloat16().t(), 1, 64, c, c)

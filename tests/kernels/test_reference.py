"""The pure-torch references against naive per-token and per-sequence loops written out here."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from ecoserve.kernels import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# tolerance of a float32-accumulated result against a float64 loop, by input dtype
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_block_tables(
    context_lens: list[int], block_size: int, gen: torch.Generator, extra_columns: int = 2
) -> tuple[Tensor, int]:
    """Distinct, shuffled blocks per sequence; unused entries -1. Returns (table, num_blocks)."""
    needed = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(context_lens), max(needed) + extra_columns), -1, dtype=torch.int32)
    for seq, count in enumerate(needed):
        table[seq, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
    return table, num_blocks


def naive_decode_attention(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor, lens: Tensor, scale: float
) -> Tensor:
    """One q head and one context position at a time, in float64."""
    batch, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float64)
    for seq in range(batch):
        for head in range(num_q_heads):
            keys, values = [], []
            for pos in range(int(lens[seq])):
                block = int(table[seq, pos // block_size])
                keys.append(k_cache[block, pos % block_size, head // group].double())
                values.append(v_cache[block, pos % block_size, head // group].double())
            scores = torch.stack(keys) @ query[seq, head].double() * scale  # [context_len]
            out[seq, head] = torch.softmax(scores, dim=0) @ torch.stack(values)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_paged_decode_attention_ref_matches_naive_loop(
    dtype: torch.dtype, block_size: int, group: int
) -> None:
    gen = torch.Generator().manual_seed(block_size * 10 + group)
    lens_list = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 2]
    table, num_blocks = make_block_tables(lens_list, block_size, gen)
    num_kv_heads, head_dim = 2, 8
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(len(lens_list), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(lens_list, dtype=torch.int32)
    scale = head_dim**-0.5

    got = reference.paged_decode_attention_ref(query, k_cache, v_cache, table, lens, scale)

    assert got.dtype == dtype and got.shape == query.shape
    expected = naive_decode_attention(query, k_cache, v_cache, table, lens, scale)
    torch.testing.assert_close(got.double(), expected, atol=ATOL[dtype], rtol=ATOL[dtype])


def test_context_of_one_returns_that_value() -> None:
    # softmax over a single position is 1, so the output is exactly the cached value
    k_cache = torch.randn(3, 4, 1, 8)
    v_cache = torch.randn(3, 4, 1, 8)
    table = torch.tensor([[2, -1]], dtype=torch.int32)
    lens = torch.tensor([1], dtype=torch.int32)
    got = reference.paged_decode_attention_ref(
        torch.randn(1, 2, 8), k_cache, v_cache, table, lens, 0.3
    )
    torch.testing.assert_close(got[0], v_cache[2, 0].expand(2, 8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_ref_matches_naive_loop_and_skips_padding(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim = 4, 4, 2, 8
    k_cache = torch.full(
        (num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype
    )
    v_cache = k_cache.clone()
    slots = torch.tensor([5, -1, 0, 15, -1, 9], dtype=torch.int64)
    key = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        expected_k[slot // block_size, slot % block_size] = key[token]
        expected_v[slot // block_size, slot % block_size] = value[token]

    reference.write_kv_ref(key, value, k_cache, v_cache, slots)

    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    # exactly the four real slots were written; padding tokens touched nothing
    assert (~k_cache.isnan().all(dim=(2, 3))).sum() == 4


def make_kv_cache(
    num_layers: int = 3, num_blocks: int = 6, dtype: torch.dtype = torch.float32
) -> Tensor:
    # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    return torch.randn(num_layers, 2, num_blocks, 4, 2, 8).to(dtype)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_blocks_ref_matches_naive_loop(id_dtype: torch.dtype) -> None:
    kv_cache = make_kv_cache()
    block_ids = torch.tensor([4, 0, 2], dtype=id_dtype)
    got = reference.gather_blocks_ref(kv_cache, block_ids)
    assert got.shape == (3, 2, 3, 4, 2, 8) and got.is_contiguous()
    for j, block in enumerate(block_ids.tolist()):
        assert torch.equal(got[:, :, j], kv_cache[:, :, block])
    # a new buffer, not a view: later cache writes must not change what is being sent
    kv_cache.zero_()
    assert got.abs().sum() > 0


def test_scatter_blocks_ref_matches_naive_loop_and_inverts_gather() -> None:
    source = make_kv_cache()
    block_ids = torch.tensor([5, 1, 3], dtype=torch.int64)
    buffer = reference.gather_blocks_ref(source, block_ids)
    target = make_kv_cache()
    expected = target.clone()
    for j, block in enumerate(block_ids.tolist()):
        expected[:, :, block] = buffer[:, :, j]

    reference.scatter_blocks_ref(buffer, target, block_ids)

    assert torch.equal(target, expected)
    assert torch.equal(target[:, :, block_ids], source[:, :, block_ids])


def test_auto_backend_on_cpu_runs_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU tensors "auto" calls the pure-torch reference and never the Triton module (whose
    interpreter would give the same numbers, so equal outputs alone would not show which ran)."""

    def no_triton() -> None:
        raise AssertionError("the auto backend reached the Triton kernels on CPU tensors")

    calls: list[str] = []
    for name in ("gather_blocks_ref", "scatter_blocks_ref"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    monkeypatch.setattr(ops, "_triton_kernels", no_triton)
    kv_cache = make_kv_cache()
    block_ids = torch.tensor([2, 3], dtype=torch.int64)
    expected = kv_cache[:, :, block_ids].clone()
    packed = ops.gather_blocks(kv_cache, block_ids)
    ops.scatter_blocks(packed, kv_cache, torch.tensor([0, 1]))
    assert torch.equal(packed, expected) and torch.equal(kv_cache[:, :, :2], expected)
    assert calls == ["gather_blocks_ref", "scatter_blocks_ref"]


def test_importing_ecoserve_kernels_does_not_import_triton() -> None:
    code = "import sys, ecoserve.kernels; print('triton' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"

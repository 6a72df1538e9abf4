"""Triton kernels vs the references on tiny shapes (interpreted on CPU, native on CUDA); errors.

Outputs are poisoned with NaN before each run so an element the kernel forgets to write fails.
Inputs are fresh random draws each run; the seed is in every failure message.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from torch import Tensor

import triton  # noqa: F401  # required (`make setup` installs it): missing is a failure, never a skip

# imported here, after tests/kernels/conftest.py has set TRITON_INTERPRET on CPU-only machines
from ecoserve.kernels import ops, reference, triton_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAN = float("nan")


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def make_decode_inputs(
    gen: torch.Generator,
    lens: list[int],
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Shuffled distinct blocks per sequence; unused table entries -1; query a strided slice."""
    needed = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(needed) + 2
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(lens), max(needed) + 1), -1, dtype=torch.int32)
    for seq, start in enumerate(torch.tensor([0, *needed]).cumsum(0)[:-1].tolist()):
        table[seq, : needed[seq]] = order[start : start + needed[seq]].int()
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # query sliced out of a wider projection, as a fused qkv output would give it
    fused = rand(gen, len(lens), num_kv_heads * group + 1, head_dim, dtype=dtype)
    return {
        "query": fused[:, : num_kv_heads * group],
        "k_cache": rand(gen, *cache_shape, dtype=dtype),
        "v_cache": rand(gen, *cache_shape, dtype=dtype),
        "block_tables": table.to(DEVICE),
        "context_lens": torch.tensor(lens, dtype=torch.int32, device=DEVICE),
    }


def test_kernels_are_interpreted_without_a_gpu() -> None:
    if DEVICE == "cpu":
        assert triton_kernels.INTERPRETED, (
            f"no GPU, yet the kernels were compiled natively (TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')!r}): either it is set to something other than 1, "
            "or "
            "ecoserve.kernels.triton_kernels was imported before tests/kernels/conftest.py set it"
        )


@pytest.mark.parametrize(
    ("dtype", "block_size", "group", "head_dim"),
    [
        (torch.float32, 4, 1, 16),
        (torch.float32, 16, 4, 16),
        (torch.float32, 6, 2, 24),  # neither block_size nor head_dim a power of two
        (torch.float16, 16, 2, 16),
        (torch.bfloat16, 4, 4, 16),
    ],
)
def test_paged_decode_attention_matches_reference(
    dtype: torch.dtype, block_size: int, group: int, head_dim: int
) -> None:
    gen, seed = fresh_generator()
    lens = [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 3]
    inputs = make_decode_inputs(gen, lens, block_size, 2, group, head_dim, dtype)
    scale = head_dim**-0.5
    out = torch.full(inputs["query"].shape, NAN, dtype=dtype, device=DEVICE)

    got = ops.paged_decode_attention(
        **inputs, scale=scale, out=out, backend="triton", check_indices=True
    )

    assert got is out
    expected = reference.paged_decode_attention_ref(**inputs, scale=scale)
    torch.testing.assert_close(
        got, expected, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"seed {seed}: {m}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_matches_reference(dtype: torch.dtype) -> None:
    gen, seed = fresh_generator()
    num_blocks, block_size, num_kv_heads, head_dim = 3, 4, 3, 8  # a row of 24: not a power of two
    caches = [
        torch.full(
            (num_blocks, block_size, num_kv_heads, head_dim), NAN, dtype=dtype, device=DEVICE
        )
        for _ in range(4)
    ]
    slots = torch.tensor([7, -1, 0, 11, 4, -1], dtype=torch.int64, device=DEVICE)
    # key/value sliced from a wider tensor: a token stride other than num_kv_heads * head_dim
    key = rand(gen, len(slots), num_kv_heads + 1, head_dim, dtype=dtype)[:, 1:]
    value = rand(gen, len(slots), num_kv_heads, head_dim, dtype=dtype)

    ops.write_kv(key, value, caches[0], caches[1], slots, backend="triton", check_indices=True)

    reference.write_kv_ref(key, value, caches[2], caches[3], slots)
    for got, expected in zip(caches[:2], caches[2:]):
        torch.testing.assert_close(
            got, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"seed {seed}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_then_scatter_match_reference(dtype: torch.dtype) -> None:
    gen, seed = fresh_generator()
    # a block of 16 * 2 * 40 = 1280 elements: more than one copy tile, with a ragged tail
    kv_cache = rand(gen, 2, 2, 5, 16, 2, 40, dtype=dtype)
    block_ids = torch.tensor([3, 0, 4], dtype=torch.int32, device=DEVICE)
    buffer = torch.full((2, 2, 3, 16, 2, 40), NAN, dtype=dtype, device=DEVICE)

    got = ops.gather_blocks(kv_cache, block_ids, out=buffer, backend="triton", check_indices=True)

    assert got is buffer
    assert torch.equal(got, reference.gather_blocks_ref(kv_cache, block_ids)), f"seed {seed}"
    target = torch.full_like(kv_cache, NAN)
    expected = target.clone()
    ops.scatter_blocks(buffer, target, block_ids, backend="triton", check_indices=True)
    reference.scatter_blocks_ref(buffer, expected, block_ids)
    torch.testing.assert_close(
        target, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"seed {seed}: {m}"
    )


def decode_args(**overrides: object) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    args: dict[str, object] = {
        **make_decode_inputs(gen, [3, 5], 4, 2, 2, 8, torch.float32),
        "scale": 0.5,
    }
    args.update(overrides)
    return args


BAD_DECODE_CALLS: dict[str, tuple[dict[str, object], type[Exception], str]] = {
    "query dtype": (
        {"query": torch.zeros(2, 4, 8, dtype=torch.float16)},
        TypeError,
        "query has dtype",
    ),
    "query head_dim": ({"query": torch.zeros(2, 4, 16)}, ValueError, "query has shape"),
    "gqa ratio": ({"query": torch.zeros(2, 3, 8)}, ValueError, "not a multiple"),
    "query stride": ({"query": torch.zeros(2, 4, 16)[:, :, ::2]}, ValueError, "last-dim stride 1"),
    "cache strides": (
        {"k_cache": torch.zeros(4, 5, 2, 8).transpose(0, 1)},
        ValueError,
        "k_cache must be contiguous",
    ),
    "table dtype": (
        {"block_tables": torch.zeros(2, 3, dtype=torch.int64)},
        TypeError,
        "block_tables has dtype",
    ),
    "lens shape": (
        {"context_lens": torch.ones(3, dtype=torch.int32)},
        ValueError,
        "context_lens has shape",
    ),
    "empty context": (
        {"context_lens": torch.tensor([0, 5], dtype=torch.int32)},
        ValueError,
        ">= 1",
    ),
    "table too narrow": (
        {"context_lens": torch.tensor([3, 13], dtype=torch.int32)},
        ValueError,
        "columns",
    ),
    "block id range": (
        {"block_tables": torch.full((2, 3), 99, dtype=torch.int32)},
        ValueError,
        "num_blocks",
    ),
    "scale": ({"scale": float("inf")}, TypeError, "scale"),
    "backend": ({"backend": "cuda"}, ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_DECODE_CALLS))
def test_paged_decode_attention_rejects(case: str) -> None:
    overrides, error, message = BAD_DECODE_CALLS[case]
    args = decode_args(**overrides)
    with pytest.raises(error, match=message):
        ops.paged_decode_attention(**args, check_indices=True)  # type: ignore[arg-type]


def test_write_kv_rejects_bad_arguments() -> None:
    k_cache, v_cache = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    key, slots = torch.zeros(3, 2, 8), torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match="key has shape"):
        ops.write_kv(torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), k_cache, v_cache, slots)
    with pytest.raises(TypeError, match="slot_mapping has dtype torch.int32"):
        ops.write_kv(key, key, k_cache, v_cache, slots.int())
    with pytest.raises(ValueError, match="dense within each token"):
        ops.write_kv(torch.zeros(3, 8, 2).transpose(1, 2), key, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="v_cache has shape"):
        ops.write_kv(key, key, k_cache, torch.zeros(2, 4, 2, 4), slots)
    with pytest.raises(ValueError, match="num_blocks \\* block_size = 8"):
        ops.write_kv(key, key, k_cache, v_cache, torch.tensor([0, 8, -1]))


def test_block_movers_reject_bad_arguments() -> None:
    kv_cache = torch.zeros(2, 2, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="dim 1 must be 2"):
        ops.gather_blocks(torch.zeros(2, 3, 4, 4, 1, 8), torch.tensor([0]))
    with pytest.raises(TypeError, match="block_ids has dtype torch.float32"):
        ops.gather_blocks(kv_cache, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="block_ids holds values in \\[0, 4\\]"):
        ops.gather_blocks(kv_cache, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.gather_blocks(
            kv_cache,
            torch.tensor([0, 1]),
            out=torch.zeros(2, 2, 4, 1, 8, 2).permute(0, 1, 5, 2, 3, 4),
        )
    with pytest.raises(ValueError, match="buffer has shape"):
        ops.scatter_blocks(torch.zeros(2, 2, 1, 4, 1, 8), kv_cache, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="distinct"):
        ops.scatter_blocks(torch.zeros(2, 2, 2, 4, 1, 8), kv_cache, torch.tensor([1, 1]))

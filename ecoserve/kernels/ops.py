"""Checked entry points for the paged KV-cache ops: validate cheaply, then run Triton or torch.

backend: "torch" runs the reference, "triton" the kernel, "auto" the kernel when the tensors are
on CUDA and triton imports, else the reference.
check_indices: whether to verify index *values* (slots, block ids, context lengths) against the
cache. Reading them forces a host sync on CUDA, so the default (None) checks only CPU tensors.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from ecoserve.kernels import reference

Backend = Literal["auto", "torch", "triton"]

_BACKENDS = ("auto", "torch", "triton")
_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds (it may still lack a GPU to run on)."""
    try:
        import triton  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def write_kv(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    *,
    backend: Backend = "auto",
    check_indices: bool | None = None,
) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] at slot_mapping (int64 [num_tokens]).

    Caches are [num_blocks, block_size, num_kv_heads, head_dim], written in place; slot < 0 skips.
    """
    num_blocks, block_size, num_kv_heads, head_dim = _check_caches(k_cache, v_cache)
    num_tokens = _check_tensor("key", key, 3, (k_cache.dtype,)).shape[0]
    _check_shape("key", key, (num_tokens, num_kv_heads, head_dim))
    _check_shape("value", _check_tensor("value", value, 3, (k_cache.dtype,)), tuple(key.shape))
    _check_rows_contiguous("key", key)
    _check_rows_contiguous("value", value)
    _check_shape(
        "slot_mapping",
        _check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,)),
        (num_tokens,),
    )
    _check_contiguous("slot_mapping", slot_mapping)
    _check_same_device(
        key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    if _should_check(check_indices, slot_mapping) and num_tokens > 0:
        _check_range(
            "slot_mapping", slot_mapping, num_blocks * block_size, "num_blocks * block_size"
        )
    if _resolve(backend, key.device) == "triton":
        _triton_kernels().write_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.write_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    *,
    out: Tensor | None = None,
    backend: Backend = "auto",
    check_indices: bool | None = None,
) -> Tensor:
    """Decode attention of query [batch, num_q_heads, head_dim] over each sequence's cached context.

    block_tables: int32 [batch, max_blocks_per_seq]; context_lens: int32 [batch], each >= 1.
    Returns [batch, num_q_heads, head_dim] in the query dtype, written into ``out`` when given.
    """
    num_blocks, block_size, num_kv_heads, head_dim = _check_caches(k_cache, v_cache)
    batch, num_q_heads = _check_tensor("query", query, 3, (k_cache.dtype,)).shape[:2]
    _check_shape("query", query, (batch, num_q_heads, head_dim))
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"query has {num_q_heads} heads, which is not a multiple of the cache's "
            f"{num_kv_heads} kv heads; num_q_heads must be k * num_kv_heads"
        )
    _check_unit_last_stride("query", query)
    _check_tensor("block_tables", block_tables, 2, (torch.int32,))
    _check_shape("block_tables", block_tables, (batch, block_tables.shape[1]))
    _check_unit_last_stride("block_tables", block_tables)
    _check_shape(
        "context_lens", _check_tensor("context_lens", context_lens, 1, (torch.int32,)), (batch,)
    )
    _check_contiguous("context_lens", context_lens)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python float, got {scale!r}")
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    else:
        _check_shape("out", _check_tensor("out", out, 3, (query.dtype,)), tuple(query.shape))
        _check_unit_last_stride("out", out)
    _check_same_device(
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        context_lens=context_lens,
        out=out,
    )
    if batch == 0:
        return out
    if _should_check(check_indices, context_lens):
        _check_block_tables(block_tables, context_lens, num_blocks, block_size)
    if _resolve(backend, query.device) == "triton":
        _triton_kernels().paged_decode_attention(
            query, k_cache, v_cache, block_tables, context_lens, float(scale), out
        )
        return out
    return reference.paged_decode_attention_ref(
        query, k_cache, v_cache, block_tables, context_lens, float(scale), out=out
    )


def gather_blocks(
    kv_cache: Tensor,
    block_ids: Tensor,
    *,
    out: Tensor | None = None,
    backend: Backend = "auto",
    check_indices: bool | None = None,
) -> Tensor:
    """Pack blocks ``block_ids`` ([n], int32/int64) of every layer into a contiguous buffer.

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    Returns [num_layers, 2, n, block_size, num_kv_heads, head_dim], written into ``out`` when given.
    """
    n = _check_block_ids(kv_cache, block_ids, check_indices)
    shape = _buffer_shape(kv_cache, n)
    if out is None:
        out = kv_cache.new_empty(shape)
    else:
        _check_shape("out", _check_tensor("out", out, 6, (kv_cache.dtype,)), shape)
        _check_contiguous("out", out)
        _check_same_device(kv_cache=kv_cache, out=out)
    if _resolve(backend, kv_cache.device) == "triton":
        _triton_kernels().gather_blocks(kv_cache, block_ids, out)
        return out
    return reference.gather_blocks_ref(kv_cache, block_ids, out=out)


def scatter_blocks(
    buffer: Tensor,
    kv_cache: Tensor,
    block_ids: Tensor,
    *,
    backend: Backend = "auto",
    check_indices: bool | None = None,
) -> None:
    """Inverse of ``gather_blocks``: write ``buffer[:, :, j]`` into block ``block_ids[j]`` in place.

    block_ids must be distinct: two buffer slices aimed at one block would race.
    """
    n = _check_block_ids(kv_cache, block_ids, check_indices)
    _check_shape(
        "buffer", _check_tensor("buffer", buffer, 6, (kv_cache.dtype,)), _buffer_shape(kv_cache, n)
    )
    _check_contiguous("buffer", buffer)
    _check_same_device(buffer=buffer, kv_cache=kv_cache)
    if _should_check(check_indices, block_ids) and torch.unique(block_ids).numel() != n:
        raise ValueError(f"block_ids must be distinct for scatter_blocks, got {block_ids.tolist()}")
    if _resolve(backend, kv_cache.device) == "triton":
        _triton_kernels().scatter_blocks(buffer, kv_cache, block_ids)
    else:
        reference.scatter_blocks_ref(buffer, kv_cache, block_ids)


def _resolve(backend: str, device: torch.device) -> Literal["torch", "triton"]:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install 'ecoserve[gpu]'")
    if device.type != "cuda" and not _triton_kernels().INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got {device.type} tensors; on CPU use "
            "backend='torch', or set TRITON_INTERPRET=1 before ecoserve.kernels.triton_kernels "
            "is imported"
        )
    return "triton"


def _triton_kernels() -> ModuleType:
    # imported on first use so that `import ecoserve.kernels` never pulls in triton
    from ecoserve.kernels import triton_kernels

    return triton_kernels


def _check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: {allowed}")
    return t


def _check_shape(name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def _check_contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}"
        )


def _check_unit_last_stride(name: str, t: Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have last-dim stride 1, got strides {t.stride()}")


def _check_rows_contiguous(name: str, t: Tensor) -> None:
    # a token's [num_kv_heads, head_dim] row must be dense; the token stride may be anything
    if not t[0:1].is_contiguous():
        raise ValueError(
            f"{name} must be dense within each token (strides [*, head_dim, 1]), "
            f"got strides {t.stride()}"
        )


def _check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def _check_caches(k_cache: Tensor, v_cache: Tensor) -> tuple[int, int, int, int]:
    _check_tensor("k_cache", k_cache, 4, _KV_DTYPES)
    _check_tensor("v_cache", v_cache, 4, (k_cache.dtype,))
    _check_shape("v_cache", v_cache, tuple(k_cache.shape))
    _check_contiguous("k_cache", k_cache)
    _check_contiguous("v_cache", v_cache)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    return num_blocks, block_size, num_kv_heads, head_dim


def _check_block_ids(kv_cache: Tensor, block_ids: Tensor, check_indices: bool | None) -> int:
    _check_tensor("kv_cache", kv_cache, 6, _KV_DTYPES)
    if kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache dim 1 must be 2 (K, V), got shape {tuple(kv_cache.shape)}")
    _check_contiguous("kv_cache", kv_cache)
    _check_tensor("block_ids", block_ids, 1, _INDEX_DTYPES)
    _check_contiguous("block_ids", block_ids)
    _check_same_device(kv_cache=kv_cache, block_ids=block_ids)
    if _should_check(check_indices, block_ids) and block_ids.numel() > 0:
        _check_range("block_ids", block_ids, kv_cache.shape[2], "num_blocks", low=0)
    return block_ids.shape[0]


def _buffer_shape(kv_cache: Tensor, n: int) -> tuple[int, ...]:
    num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    return (num_layers, 2, n, block_size, num_kv_heads, head_dim)


def _check_block_tables(
    block_tables: Tensor, context_lens: Tensor, num_blocks: int, block_size: int
) -> None:
    lens = context_lens.long()
    if int(lens.min()) < 1:
        raise ValueError(f"context_lens must all be >= 1, got {context_lens.tolist()}")
    needed = (lens + block_size - 1) // block_size  # [batch]
    if int(needed.max()) > block_tables.shape[1]:
        raise ValueError(
            f"context_lens up to {int(lens.max())} need {int(needed.max())} blocks "
            f"of {block_size}, "
            f"but block_tables has only {block_tables.shape[1]} columns"
        )
    used = (
        torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < needed[:, None]
    )
    _check_range(
        "block_tables (entries in use)", block_tables[used], num_blocks, "num_blocks", low=0
    )


def _check_range(name: str, t: Tensor, high: int, high_name: str, low: int | None = None) -> None:
    # values below `low` are allowed when low is None (write_kv's negative padding slots)
    if t.numel() == 0:
        return
    top, bottom = int(t.max()), int(t.min())
    if top >= high or (low is not None and bottom < low):
        lower = f"{low} <= " if low is not None else ""
        raise ValueError(
            f"{name} holds values in [{bottom}, {top}]; "
            f"allowed: {lower}value < {high_name} = {high}"
        )


def _should_check(check_indices: bool | None, t: Tensor) -> bool:
    return t.device.type == "cpu" if check_indices is None else check_indices

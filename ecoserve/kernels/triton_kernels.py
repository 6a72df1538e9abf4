"""Triton kernels for the paged KV cache and their launchers; imported only by the triton backend.

The launchers trust their arguments: ``ops.py`` checks shapes, dtypes, strides and index ranges
first. Whether the kernels run natively or under the interpreter is fixed when this module is
imported (``TRITON_INTERPRET`` is read as ``@triton.jit`` decorates each kernel).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

# True when the kernels below were built for the CPU interpreter rather than a GPU.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# elements one gather/scatter program copies per loop step
_COPY_TILE = 1024


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    key_stride,
    value_stride,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    ROW_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)  # int64, so the cache offset below cannot overflow
    if slot < 0:
        return
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    k = tl.load(key_ptr + token.to(tl.int64) * key_stride + offs, mask=mask)
    v = tl.load(value_ptr + token.to(tl.int64) * value_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def write_kv(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim]; caches contiguous; slot_mapping int64."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row = key.shape[1] * key.shape[2]
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        ROW=row,
        ROW_PAD=triton.next_power_of_2(row),
    )


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    scale,
    q_stride_b,
    q_stride_h,
    out_stride_b,
    out_stride_h,
    table_stride,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,  # q heads per kv head
    BLOCK_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    GROUP_PAD: tl.constexpr,
):
    # One program per (sequence, kv head): it serves all GROUP q heads that share the kv head,
    # so each K/V block is read from memory once, not once per q head.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx_len = tl.load(lens_ptr + seq)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_t = tl.arange(0, BLOCK_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM

    q_heads = kv_head * GROUP + offs_g  # [GROUP_PAD]
    q_offs = seq.to(tl.int64) * q_stride_b + q_heads[:, None] * q_stride_h + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    # fold log2(e) = 1.4427 into the scale so the loop can use exp2
    q = q.to(tl.float32) * (scale * 1.4426950408889634)  # [GROUP_PAD, HEAD_DIM_PAD]

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([GROUP_PAD], tl.float32)  # running softmax denominator
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)

    # within a block, token t of kv head h sits at ((t * NUM_KV_HEADS) + h) * HEAD_DIM
    tile_offs = (offs_t[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + offs_d[None, :]
    num_blocks = tl.cdiv(ctx_len, BLOCK_SIZE)
    for i in range(num_blocks):
        block_id = tl.load(table_ptr + seq.to(tl.int64) * table_stride + i).to(tl.int64)
        t_valid = (offs_t < BLOCK_SIZE) & (i * BLOCK_SIZE + offs_t < ctx_len)  # [BLOCK_PAD]
        kv_mask = t_valid[:, None] & d_mask[None, :]
        base = block_id * (BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM)
        k = tl.load(k_cache_ptr + base + tile_offs, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + base + tile_offs, mask=kv_mask, other=0.0).to(tl.float32)
        # [GROUP_PAD, BLOCK_PAD]; a broadcast product, as GROUP is often below tl.dot's minimum 16
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(t_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # m_new is finite: every visited block holds at least one valid position (ctx_len >= 1)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    out = acc / l[:, None]
    out_offs = seq.to(tl.int64) * out_stride_b + q_heads[:, None] * out_stride_h + offs_d[None, :]
    tl.store(
        out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :]
    )


def paged_decode_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    out: Tensor,
) -> None:
    """query, out: [batch, num_q_heads, head_dim] with unit last stride; caches contiguous."""
    batch, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if batch == 0:
        return
    group = num_q_heads // num_kv_heads
    _paged_decode_kernel[(batch, num_kv_heads)](
        query,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        float(scale),
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        GROUP=group,
        BLOCK_PAD=triton.next_power_of_2(block_size),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        GROUP_PAD=triton.next_power_of_2(group),
    )


@triton.jit
def _copy_blocks_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,
    num_cache_blocks,
    num_ids,
    CHUNK: tl.constexpr,  # block_size * num_kv_heads * head_dim
    TILE: tl.constexpr,
    TO_BUFFER: tl.constexpr,  # True: gather cache -> buffer; False: scatter buffer -> cache
):
    # One program per (listed block, layer * 2 + k_or_v): one contiguous CHUNK on each side.
    j = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 for K, 1 for V)
    block_id = tl.load(ids_ptr + j).to(tl.int64)
    cache_off = (plane * num_cache_blocks + block_id) * CHUNK
    buffer_off = (plane * num_ids + j) * CHUNK
    if TO_BUFFER:
        src_off = cache_off
        dst_off = buffer_off
    else:
        src_off = buffer_off
        dst_off = cache_off
    for start in range(0, CHUNK, TILE):
        offs = start + tl.arange(0, TILE)
        mask = offs < CHUNK
        tl.store(dst_ptr + dst_off + offs, tl.load(src_ptr + src_off + offs, mask=mask), mask=mask)


def _copy_blocks(cache: Tensor, buffer: Tensor, block_ids: Tensor, to_buffer: bool) -> None:
    num_layers, _, num_cache_blocks, block_size, num_kv_heads, head_dim = cache.shape
    num_ids = block_ids.shape[0]
    if num_ids == 0:
        return
    chunk = block_size * num_kv_heads * head_dim
    src, dst = (cache, buffer) if to_buffer else (buffer, cache)
    _copy_blocks_kernel[(num_ids, num_layers * 2)](
        src,
        dst,
        block_ids,
        num_cache_blocks,
        num_ids,
        CHUNK=chunk,
        TILE=min(_COPY_TILE, triton.next_power_of_2(chunk)),
        TO_BUFFER=to_buffer,
    )


def gather_blocks(kv_cache: Tensor, block_ids: Tensor, out: Tensor) -> None:
    """kv_cache [num_layers, 2, num_blocks, ...] -> out [num_layers, 2, n, ...], both contiguous."""
    _copy_blocks(kv_cache, out, block_ids, to_buffer=True)


def scatter_blocks(buffer: Tensor, kv_cache: Tensor, block_ids: Tensor) -> None:
    """Inverse of ``gather_blocks``; writes into ``kv_cache`` in place."""
    _copy_blocks(kv_cache, buffer, block_ids, to_buffer=False)

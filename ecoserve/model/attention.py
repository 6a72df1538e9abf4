"""Attention over a paged KV cache for a flattened batch that mixes prefill chunks and decodes.

Token layout of a step: all prefill chunks first (one segment per sequence), then one token per
decoding sequence. The metadata below is built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ecoserve.kernels import cpu, ops


@dataclass(frozen=True)
class PrefillSegment:
    """One sequence's prefill chunk inside the flattened batch."""

    q_start: int  # first row of this chunk in the flattened batch
    q_len: int  # tokens in the chunk
    context_len: int  # tokens cached for the sequence once this chunk is written
    # Set only when earlier tokens are already cached (a later chunk, or a resumed prefix):
    gather_blocks: torch.Tensor | None  # [num_blocks_of_seq] int64 blocks holding the context
    mask: torch.Tensor | None  # [q_len, context_len] bool, bottom-right-aligned causal


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs for one step; tensors live on the model's device."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    prefills: tuple[PrefillSegment, ...]
    decode_start: int  # first decode row; rows [decode_start, num_tokens) are decodes
    num_decodes: int
    # Torch path: every decode's blocks, padded to the same count with block 0 (masked out).
    decode_blocks: torch.Tensor | None  # [num_decodes * max_blocks] int64
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] additive: 0 or -inf
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32 (kernel paths)
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32 (kernel paths)
    use_kernels: bool = False  # paged decode attention through ecoserve.kernels (GPU)
    use_cpu_kernel: bool = False  # paged decode attention through the C kernel (kernels/cpu.py)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write the new K/V into the cache, then attend.

    q [num_tokens, num_q_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim];
    k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. Returns q's shape.
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    if meta.use_kernels:
        ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, backend="triton", check_indices=False)
    else:
        # The runner emits no padding slots, so a plain index_copy_ is the whole write (the
        # reference in kernels/ also handles slot -1, at the cost of a masked copy per layer).
        # [num_blocks * block_size, num_kv_heads, head_dim]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    if not meta.prefills:  # decode-only step: no output buffer to assemble
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    # Prompt attention in 4-D ([1, heads, tokens, head_dim]): on the CPU, SDPA takes its fused
    # flash kernel for 4-D inputs and falls back to the unfused math path (bmm, softmax, masks)
    # for 3-D ones with enable_gqa; measured 2-8x per call on SmolLM2's shapes, same values to
    # float32 rounding.
    for seg in meta.prefills:
        rows = slice(seg.q_start, seg.q_start + seg.q_len)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, num_q_heads, q_len, head_dim]
        if seg.gather_blocks is None:
            ks, vs = k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            n = seg.context_len
            # [1, num_kv_heads, context_len, head_dim]
            ks = k_cache.index_select(0, seg.gather_blocks).view(-1, num_kv_heads, head_dim)[:n].transpose(0, 1).unsqueeze(0)
            vs = v_cache.index_select(0, seg.gather_blocks).view(-1, num_kv_heads, head_dim)[:n].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask, scale=scale, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    if meta.num_decodes:
        out[meta.decode_start :] = _decode_attention(q[meta.decode_start :], k_cache, v_cache, meta, scale)
    return out


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence; q [num_decodes, num_q_heads, head_dim]."""
    if meta.use_cpu_kernel:
        # Reads each sequence's blocks where they lie: no gather, no padding to the longest.
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        return cpu.paged_decode_attention(
            q.contiguous(), k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
        )
    if meta.use_kernels:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        return ops.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, backend="triton", check_indices=False
        )
    assert meta.decode_blocks is not None and meta.decode_mask is not None
    num_decodes, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    # GQA without copying K/V: the `group` query heads that share a KV head become that head's
    # query rows. q head h reads kv head h // group, so heads are laid out [kv_head, group].
    qg = q.view(num_decodes, num_kv_heads, group, head_dim)
    # Whole blocks via index_select: measured ~2x faster on CPU than gathering token slots.
    shape = (num_decodes, -1, num_kv_heads, head_dim)
    ks = k_cache.index_select(0, meta.decode_blocks).view(shape).permute(0, 2, 1, 3)  # [num_decodes, num_kv_heads, max_blocks * block_size, head_dim]
    vs = v_cache.index_select(0, meta.decode_blocks).view(shape).permute(0, 2, 1, 3)
    o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=meta.decode_mask, scale=scale)
    return o.reshape(num_decodes, num_q_heads, head_dim)

"""Pure-torch references for the paged KV-cache kernels: the spec the Triton kernels must meet.

They take already-validated arguments (see ``ops.py``) and favour clarity over speed; each
runs on any device torch supports.
"""

from __future__ import annotations

import torch
from torch import Tensor


def write_kv_ref(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
) -> None:
    """Store each token's key and value at its slot; slots < 0 are padding and left alone.

    key, value: [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], written in place
    slot_mapping: [num_tokens], slot = block_id * block_size + offset_in_block
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    # view (never reshape): a copy would silently drop the in-place write
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[
        keep
    ]  # [num_slots, num_kv_heads, head_dim]
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[keep]


def paged_decode_attention_ref(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """Attention of one new token per sequence over its cached context, softmax in float32.

    query: [batch, num_q_heads, head_dim]; q head h reads kv head h // (num_q_heads // num_kv_heads)
    block_tables: [batch, max_blocks_per_seq]; context_lens: [batch], each >= 1
    Returns [batch, num_q_heads, head_dim] in the query dtype (into ``out`` when given).
    """
    batch, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    lens = context_lens.long()
    # one host sync: the padded context length sets the gathered tensor's size
    num_blocks = int((lens.max().item() + block_size - 1) // block_size)
    # unused table entries may hold -1 or garbage; clamp so the gather stays in range, then mask
    table = (
        block_tables[:, :num_blocks].long().clamp(0, k_cache.shape[0] - 1)
    )  # [batch, num_blocks]
    keys = (
        k_cache[table].flatten(1, 2).float()
    )  # [batch, num_blocks * block_size, num_kv_heads, head_dim]
    values = v_cache[table].flatten(1, 2).float()
    q = query.float().reshape(batch, num_kv_heads, group, head_dim)
    scores = (
        torch.einsum("bkgd,btkd->bkgt", q, keys) * scale
    )  # [batch, num_kv_heads, group, padded_len]
    positions = torch.arange(keys.shape[1], device=query.device)
    valid = positions[None, :] < lens[:, None]  # [batch, padded_len]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attn = torch.einsum("bkgt,btkd->bkgd", probs, values).reshape(batch, num_q_heads, head_dim)
    if out is None:
        return attn.to(query.dtype)
    out.copy_(attn)
    return out


def gather_blocks_ref(kv_cache: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack the given blocks of every layer into one buffer, in ``block_ids`` order.

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: [n]
    Returns [num_layers, 2, n, block_size, num_kv_heads, head_dim] (into ``out`` when given).
    """
    ids = block_ids.long()
    if out is None:
        return kv_cache.index_select(2, ids)
    return torch.index_select(kv_cache, 2, ids, out=out)


def scatter_blocks_ref(buffer: Tensor, kv_cache: Tensor, block_ids: Tensor) -> None:
    """Inverse of ``gather_blocks_ref``: write ``buffer[:, :, j]`` into block ``block_ids[j]``.

    buffer: [num_layers, 2, n, block_size, num_kv_heads, head_dim]
    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], written in place
    """
    kv_cache.index_copy_(2, block_ids.long(), buffer)

"""Host-memory swap space for KV blocks: where a preempted sequence's KV waits to be resumed.

It mirrors the device KV tensor's layout, [num_layers, 2, num_blocks, block_size, kv_heads,
head_dim], with its own block count, and keeps its own `BlockPool` for bookkeeping. Swapping
out copies whole device blocks into free host blocks; swapping in copies them back into device
blocks the caller has allocated and frees the host blocks. Copies gather and scatter along the
block axis (index_select / index_copy_), so neither side needs consecutive block ids.

The host tensor is pinned only when the device KV lives on CUDA (pinning is a CUDA notion and
costs locked memory; on CPU it would buy nothing). Both copies complete before they return:
device-to-host lands in host memory at once, and host-to-device is queued on the current
stream ahead of any later forward pass, so the caller may free or reuse the source blocks
right after.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ecoserve.kv_cache.block_pool import BlockPool

BLOCK_AXIS = 2  # the num_blocks axis of [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]


class HostSwapSpace:
    """`num_blocks` host KV blocks shaped like the blocks of `device_kv`."""

    def __init__(self, device_kv: torch.Tensor, num_blocks: int) -> None:
        if device_kv.dim() != 6:
            raise ValueError(
                "device_kv must be the paged KV tensor [num_layers, 2, num_blocks, block_size, kv_heads, "
                f"head_dim]; got {device_kv.dim()} dimensions"
            )
        if num_blocks < 1:
            raise ValueError(f"a host swap space needs num_blocks >= 1, got {num_blocks}")
        shape = list(device_kv.shape)
        shape[BLOCK_AXIS] = num_blocks
        self.pool = BlockPool(num_blocks, block_size=int(device_kv.shape[3]))
        self.kv = torch.zeros(shape, dtype=device_kv.dtype, device="cpu", pin_memory=device_kv.is_cuda)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def swap_out(self, device_kv: torch.Tensor, device_block_ids: Sequence[int]) -> list[int]:
        """Copy the given device blocks into newly allocated host blocks; returns their ids, in
        the same order. Raises OutOfBlocksError, with nothing allocated or copied, if the swap
        space has fewer free blocks than asked for."""
        self._check_layout(device_kv)
        if not device_block_ids:
            return []
        host_ids = self.pool.allocate(len(device_block_ids))
        src = device_kv.index_select(BLOCK_AXIS, _index(device_block_ids, device_kv.device))
        self.kv.index_copy_(BLOCK_AXIS, _index(host_ids, self.kv.device), src.to(self.kv.device))
        return host_ids

    def swap_in(self, host_ids: Sequence[int], device_kv: torch.Tensor, device_block_ids: Sequence[int]) -> None:
        """Copy host blocks `host_ids[i]` into device blocks `device_block_ids[i]` (allocated by
        the caller), then free the host blocks. Bad arguments raise ValueError and change nothing."""
        self._check_layout(device_kv)
        if len(host_ids) != len(device_block_ids):
            raise ValueError(
                f"swap_in needs one device block per host block; got {len(host_ids)} host blocks "
                f"and {len(device_block_ids)} device blocks"
            )
        self._check_allocated(host_ids)
        if not host_ids:
            return
        src = self.kv.index_select(BLOCK_AXIS, _index(host_ids, self.kv.device))
        device_kv.index_copy_(BLOCK_AXIS, _index(device_block_ids, device_kv.device), src.to(device_kv.device))
        self.pool.free(host_ids)

    def free(self, host_ids: Sequence[int]) -> None:
        """Give host blocks back without copying them (their sequence ended or was dropped)."""
        self.pool.free(host_ids)

    def _check_layout(self, device_kv: torch.Tensor) -> None:
        ours = self.kv.shape[:BLOCK_AXIS] + self.kv.shape[BLOCK_AXIS + 1 :]
        theirs = device_kv.shape[:BLOCK_AXIS] + device_kv.shape[BLOCK_AXIS + 1 :]
        if device_kv.dim() != 6 or ours != theirs or device_kv.dtype != self.kv.dtype:
            raise ValueError(
                f"device KV {tuple(device_kv.shape)} {device_kv.dtype} does not match the swap space's "
                f"block layout {tuple(self.kv.shape)} {self.kv.dtype} (all but the block axis must agree)"
            )

    def _check_allocated(self, host_ids: Sequence[int]) -> None:
        bad = [b for b in host_ids if not 0 <= b < self.num_blocks or self.pool.ref_count(b) <= 0]
        if bad:
            raise ValueError(f"host blocks {bad[:8]} are not allocated in the swap space of {self.num_blocks} blocks")
        if len(set(host_ids)) != len(host_ids):
            raise ValueError(f"host block ids repeat: {list(host_ids)[:16]}")


def _index(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.long, device=device)


"""A pool of fixed-size KV blocks with reference counts.

The pool does bookkeeping only; the tensors live with the model runner. Block ids index the
`num_blocks` axis of the worker's KV tensor, and a token's slot is
`block_id * block_size + offset_in_block`.

Placement. A multi-block allocation takes the smallest run of consecutive free ids that holds
it whole (best fit, lowest id on ties); single blocks, and allocations no run can hold, take
the lowest free ids. So a request's prompt blocks are consecutive whenever the pool's free
space allows, and the KV transfer sends from and receives into the paged blocks directly,
without packing them (kv_transfer/engine.py). Finding runs scans a free mask in numpy,
O(num_blocks) in C, only for allocations of two or more blocks.
"""

from __future__ import annotations

import heapq

import numpy as np
from typing import Iterable


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free; the pool is left unchanged."""


class BlockPool:
    """Free list plus per-block reference counts (a block is free exactly when its count is 0)."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        # Lowest-first free ids: a heap with lazy deletion (an entry whose block is allocated
        # is stale and skipped), because best-fit runs are taken out of the middle of it.
        self._heap: list[int] = list(range(num_blocks))  # sorted is a valid heap
        self._free_mask = np.ones(num_blocks, dtype=np.bool_)  # the truth: True = free
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num: int) -> bool:
        return num <= self._num_free

    def allocate(self, num: int) -> list[int]:
        """Take `num` free blocks (reference count 1 each), or raise OutOfBlocksError."""
        if num < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num})")
        if num > self._num_free:
            raise OutOfBlocksError(
                f"asked for {num} KV blocks but only {self._num_free} of {self.num_blocks} are free"
            )
        start = self._best_fit(num) if num > 1 else None
        blocks = list(range(start, start + num)) if start is not None else self._lowest(num)
        for b in blocks:
            self._ref_counts[b] = 1
        self._free_mask[blocks] = False
        self._num_free -= num
        return blocks

    def _lowest(self, num: int) -> list[int]:
        out: list[int] = []
        while len(out) < num:
            b = heapq.heappop(self._heap)
            if self._ref_counts[b] == 0 and (not out or out[-1] != b):
                out.append(b)
        return out

    def _best_fit(self, num: int) -> int | None:
        """Start of the smallest free run of at least `num` blocks, or None."""
        edges = np.diff(self._free_mask.view(np.int8), prepend=0, append=0)
        starts = np.flatnonzero(edges == 1)
        lengths = np.flatnonzero(edges == -1) - starts
        fits = np.flatnonzero(lengths >= num)
        if fits.size == 0:
            return None
        return int(starts[fits[np.argmin(lengths[fits])]])

    def incref(self, blocks: Iterable[int]) -> None:
        """Share already-allocated blocks (e.g. a prefix held by two requests)."""
        blocks = list(blocks)
        for b in blocks:
            self._check_allocated(b)
        for b in blocks:
            self._ref_counts[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        blocks = list(blocks)
        for b in blocks:
            self._check_allocated(b)
        for b in blocks:
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                heapq.heappush(self._heap, b)
                self._free_mask[b] = True
                self._num_free += 1
        if len(self._heap) > 4 * self.num_blocks:  # too many stale entries: rebuild
            self._heap = np.flatnonzero(self._free_mask).tolist()

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def _check_allocated(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block} is outside the pool [0, {self.num_blocks})")
        if self._ref_counts[block] <= 0:
            raise ValueError(f"block {block} is not allocated (double free?)")

    def check_invariants(self) -> None:
        """Every block is either free (count 0, listed once) or allocated (count > 0, unlisted)."""
        listed = set(self._heap)
        for b, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {b} has negative reference count {count}"
            assert (count == 0) == bool(self._free_mask[b]), f"block {b}: count {count} but free={self._free_mask[b]}"
            assert count > 0 or b in listed, f"free block {b} is missing from the free heap"
        assert self._num_free == int(self._free_mask.sum()), "free count out of step with the free mask"

    def assert_no_leaks(self) -> None:
        """Fail unless every block is back in the pool (call when no request is live)."""
        self.check_invariants()
        leaked = [b for b, c in enumerate(self._ref_counts) if c]
        assert not leaked, f"{len(leaked)} KV blocks still allocated: {leaked[:16]}"

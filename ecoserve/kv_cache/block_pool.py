"""A pool of fixed-size KV blocks with reference counts.

The pool does bookkeeping only; the tensors live with the model runner. Block ids index the
`num_blocks` axis of the worker's KV tensor, and a token's slot is
`block_id * block_size + offset_in_block`.
"""

from __future__ import annotations

from collections import deque
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
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num: int) -> bool:
        return num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        """Take `num` free blocks (reference count 1 each), or raise OutOfBlocksError."""
        if num < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num})")
        if num > len(self._free):
            raise OutOfBlocksError(
                f"asked for {num} KV blocks but only {len(self._free)} of {self.num_blocks} are free"
            )
        blocks = [self._free.popleft() for _ in range(num)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

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
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def _check_allocated(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block} is outside the pool [0, {self.num_blocks})")
        if self._ref_counts[block] <= 0:
            raise ValueError(f"block {block} is not allocated (double free?)")

    def check_invariants(self) -> None:
        """Every block is either free (count 0, listed once) or allocated (count > 0, unlisted)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {b} has negative reference count {count}"
            assert (count == 0) == (b in free), f"block {b}: count {count} but free={b in free}"

    def assert_no_leaks(self) -> None:
        """Fail unless every block is back in the pool (call when no request is live)."""
        self.check_invariants()
        leaked = [b for b, c in enumerate(self._ref_counts) if c]
        assert not leaked, f"{len(leaked)} KV blocks still allocated: {leaked[:16]}"

"""Per-request block table: the ordered blocks that hold a request's tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from ecoserve.kv_cache.block_pool import BlockPool


@dataclass
class BlockTable:
    """Logical token i of the request lives in block `blocks[i // block_size]`."""

    block_size: int
    blocks: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        """Tokens the table can hold without another block."""
        return len(self.blocks) * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Extra blocks needed so that `num_tokens` tokens fit."""
        return max(0, -(-num_tokens // self.block_size) - len(self.blocks))

    def ensure_capacity(self, num_tokens: int, pool: BlockPool) -> None:
        """Grow to hold `num_tokens` tokens; raises OutOfBlocksError and changes nothing if short."""
        need = self.blocks_needed(num_tokens)
        if need:
            self.blocks.extend(pool.allocate(need))

    def slot(self, position: int) -> int:
        """Flat slot index of token `position` in the KV tensor."""
        return self.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, start: int, end: int) -> list[int]:
        """Slots of tokens [start, end)."""
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def release(self, pool: BlockPool) -> None:
        """Return every block to the pool and empty the table."""
        pool.free(self.blocks)
        self.blocks = []

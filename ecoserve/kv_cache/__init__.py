"""Paged KV cache: a block pool with reference counts and per-request block tables, shared by prefill and decode."""

from ecoserve.kv_cache.block_pool import BlockPool, OutOfBlocksError
from ecoserve.kv_cache.block_table import BlockTable

__all__ = ["BlockPool", "BlockTable", "OutOfBlocksError"]

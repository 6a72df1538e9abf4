"""Paged KV cache: a block pool with reference counts and per-request block tables, shared by prefill and decode, and a host-memory swap space for preempted requests."""

from ecoserve.kv_cache.block_pool import BlockPool, OutOfBlocksError
from ecoserve.kv_cache.block_table import BlockTable
from ecoserve.kv_cache.host_pool import HostSwapSpace

__all__ = ["BlockPool", "BlockTable", "HostSwapSpace", "OutOfBlocksError"]

"""Paged KV cache: a block pool with reference counts and per-request block tables, shared by prefill and decode, and a host-memory swap space for preempted requests."""

from typing import TYPE_CHECKING, Any

from ecoserve.kv_cache.block_pool import BlockPool, OutOfBlocksError
from ecoserve.kv_cache.block_table import BlockTable

if TYPE_CHECKING:
    from ecoserve.kv_cache.host_pool import HostSwapSpace

__all__ = ["BlockPool", "BlockTable", "HostSwapSpace", "OutOfBlocksError"]


def __getattr__(name: str) -> Any:
    # The swap space holds torch tensors: imported on first use, so the torch-free users of the
    # block pool (coordinator, simulator) do not pay for torch.
    if name == "HostSwapSpace":
        from ecoserve.kv_cache.host_pool import HostSwapSpace

        return HostSwapSpace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

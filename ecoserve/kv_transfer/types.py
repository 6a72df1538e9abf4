"""Plain data shared by both halves of the KV transfer: plans, states, updates, compatibility.

Torch-free: the coordinator imports this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

DEFAULT_GROUP_BLOCKS = 256  # blocks per KV message: 4,096 tokens at block size 16 (fewer, larger messages)


class TransferState(enum.Enum):
    """Where one side's half of a transfer stands; polled through ``KVTransferWorker.poll``."""

    QUEUED = "queued"  # accepted, not posted yet: waiting for its turn in the pair's sequence
    # or for room under the pair's in-flight bound
    IN_FLIGHT = "in_flight"  # its sends / receives are posted to the backend
    DONE = "done"  # sender: every chunk sent; receiver: every chunk scattered into its blocks
    FAILED = "failed"  # the backend reported an error (the update's message keeps it)
    TIMED_OUT = "timed_out"  # the deadline passed before DONE

    @property
    def terminal(self) -> bool:
        """No further change: the caller may free the transfer's blocks."""
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.TIMED_OUT)


@dataclass(frozen=True)
class TransferPlan:
    """One request's prompt KV moving from ``src_rank`` to ``dst_rank``; made by the planner."""

    request_id: str  # the coordinator's request id
    src_rank: int  # torch.distributed rank of the prefill worker that holds the KV
    dst_rank: int  # rank of the decode worker that reserved blocks for it
    seq_no: int  # position in the (src_rank, dst_rank) pair's sequence; both sides post in it
    num_tokens: int  # prompt tokens whose KV moves: ceil(num_tokens / block_size) blocks

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        for name in ("src_rank", "dst_rank", "seq_no"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.src_rank == self.dst_rank:
            raise ValueError(
                f"src_rank and dst_rank must differ (a rank does not send to itself), "
                f"got {self.src_rank} for both"
            )
        n = self.num_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {n!r}")

    def num_blocks(self, block_size: int) -> int:
        """Blocks holding ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
        return -(-self.num_tokens // block_size)


@dataclass(frozen=True)
class TransferUpdate:
    """A state change reported by ``KVTransferWorker.poll``."""

    request_id: str
    state: TransferState
    message: str = ""  # why, for FAILED and TIMED_OUT


class IncompatibleWorkerError(ValueError):
    """A prefill and a decode worker whose KV caches cannot be exchanged."""


@dataclass(frozen=True)
class CompatRecord:
    """What must agree between two workers for their KV blocks to be exchangeable."""

    model_id: str
    dtype: str  # e.g. "float32", "bfloat16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per KV block

    def __post_init__(self) -> None:
        for name in ("model_id", "dtype"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def mismatches(self, other: CompatRecord) -> list[str]:
        """Every differing field as ``"field: mine != theirs"``; empty when compatible."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name}: {mine!r} != {theirs!r}")
        return out

    def check_compatible(self, other: CompatRecord, who: str) -> None:
        """Raise ``IncompatibleWorkerError`` naming every mismatch between this record and
        ``other`` (described as ``who``, e.g. "decode worker rank 3")."""
        diffs = self.mismatches(other)
        if diffs:
            raise IncompatibleWorkerError(
                f"{who} cannot exchange KV blocks with this worker ({'; '.join(diffs)}, "
                "this side first): both sides must serve the same model and dtype with the "
                "same layers, KV heads, head dim and block size"
            )


__all__ = [
    "CompatRecord",
    "IncompatibleWorkerError",
    "TransferPlan",
    "TransferState",
    "TransferUpdate",
]

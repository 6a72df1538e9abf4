"""The coordinator's registry of worker ranks: registration checks, views, liveness."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from ecoserve import protocol as p
from ecoserve.coordinator.policy import WorkerView
from ecoserve.kv_transfer.types import CompatRecord, IncompatibleWorkerError


@dataclass(frozen=True)
class ExpectedRank:
    rank: int
    role: str


@dataclass(frozen=True)
class Silence:
    """How long a rank declared lost for its silence had not been heard from: when it was
    declared, and at the check before (at most the timeout, or it would have been declared then)."""

    silent_s: float
    silent_at_previous_check_s: float


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


def worker_identity(rank: int) -> bytes:
    """The ZeroMQ routing id of rank `rank`'s control socket (set by the worker, used to reply)."""
    return f"rank-{rank}".encode()


class WorkerRegistry:
    def __init__(self, expected: list[ExpectedRank], secret: str, heartbeat_timeout_s: float) -> None:
        self.expected = {e.rank: e.role for e in expected}
        self.secret = secret
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.views: dict[int, WorkerView] = {}
        self.info: dict[int, p.RegisterWorker] = {}
        self.last_seen: dict[int, float] = {}
        self.silences: dict[int, Silence] = {}  # ranks `silent` found, for the stats
        self._last_check = time.monotonic()
        self.compat: CompatRecord | None = None

    @property
    def complete(self) -> bool:
        return len(self.views) == len(self.expected)

    def register(self, msg: p.RegisterWorker, sender: bytes | None = None) -> str | None:
        """Add the worker, or return why it is refused (nothing changes then). `sender` is the
        routing id the registration came from: it must be the rank's own (`worker_identity`)."""
        if msg.protocol_version != p.PROTOCOL_VERSION:
            return f"protocol version {msg.protocol_version} != the coordinator's {p.PROTOCOL_VERSION}"
        if not hmac.compare_digest(msg.secret.encode(), self.secret.encode()):  # constant time: no guessing by timing
            return "wrong cluster secret"
        if sender is not None and sender != worker_identity(msg.rank):
            return f"rank {msg.rank} must register from its own control socket (routing id {worker_identity(msg.rank)!r})"
        if self.expected.get(msg.rank) != msg.role:
            want = {r: role for r, role in sorted(self.expected.items())}
            return f"rank {msg.rank} with role {msg.role!r} is not part of this cluster (expected ranks/roles: {want})"
        if msg.rank in self.views and self.views[msg.rank].alive:
            return f"rank {msg.rank} is already registered"
        record = CompatRecord(msg.model_id, msg.dtype, msg.num_layers, msg.num_kv_heads, msg.head_dim, msg.block_size)
        if self.compat is not None:
            try:
                self.compat.check_compatible(record, f"rank {msg.rank}")
            except IncompatibleWorkerError as exc:
                return str(exc)
        self.compat = self.compat or record
        self.info[msg.rank] = msg
        self.views[msg.rank] = WorkerView(
            rank=msg.rank, role=msg.role, num_blocks=msg.num_blocks, block_size=msg.block_size,
            token_budget=msg.max_num_batched_tokens, free_blocks=msg.num_blocks,
            kv_bytes_per_token=2 * msg.num_layers * msg.num_kv_heads * msg.head_dim * _DTYPE_BYTES.get(msg.dtype, 4),
        )
        self.last_seen[msg.rank] = time.monotonic()
        return None

    def rank_of(self, sender: bytes) -> int | None:
        """The registered rank whose control socket `sender` is; None for anyone else."""
        rank = sender[5:]
        if not (sender.startswith(b"rank-") and rank.isdigit() and len(rank) < 10):
            return None
        n = int(rank)
        return n if n in self.views and worker_identity(n) == sender else None

    def seen(self, rank: int) -> WorkerView | None:
        """Note that `rank` spoke; its view if it is a registered, live worker."""
        view = self.views.get(rank)
        if view is None or not view.alive:
            return None
        self.last_seen[rank] = time.monotonic()
        return view

    def silent(self, now: float) -> list[int]:
        """Live ranks that have not spoken within the heartbeat timeout; each one's `Silence` is
        recorded in `silences` (this is the check the coordinator's monitor runs)."""
        found = [r for r, v in self.views.items() if v.alive and now - self.last_seen[r] > self.heartbeat_timeout_s]
        for r in found:
            self.silences[r] = Silence(now - self.last_seen[r], self._last_check - self.last_seen[r])
        self._last_check = now
        return found

    def alive_ranks(self) -> list[int]:
        return [r for r, v in self.views.items() if v.alive]

    def min_request_pool(self) -> int:
        """The smallest pool a whole request must fit in (decode or mixed workers)."""
        pools = [v.num_blocks for v in self.views.values() if v.role in ("decode", "mixed")]
        return min(pools) if pools else 0

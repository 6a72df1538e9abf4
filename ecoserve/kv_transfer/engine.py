"""Worker half of the KV transfer: move a request's prompt KV between paged caches, polled.

Ordering. Each (src, dst) pair numbers its transfers 0, 1, 2, ... (the planner's seq_no). Both
sides post a pair's transfers strictly in seq_no order, whatever order they were enqueued in,
and at most ``max_in_flight_per_pair`` of them at once, so both sides post the same ops in the
same order (NCCL matches by order alone). No seq_no is ever skipped: a transfer that timed out
while still queued is posted anyway when its turn comes, "hollow" (the sender sends zeros, the
receiver drops what arrives), so the pair stays in step. A transfer counts against the bound
from posting until every op of it has finished in the backend, even after it timed out.

Messages. A transfer opens with a one-element int64 header (see Deadlines), then moves as one
message per (layer, K or V, group of ``group_blocks`` consecutive logical blocks):
``[k, block_size, num_kv_heads, head_dim]`` each. The structure
depends only on the plan and ``group_blocks``, so both sides agree on it whatever their block
ids. Each side then chooses per message, on its own: when its blocks for the group are
consecutive ids, the message is a view of the cache itself (``kv_cache[l, kv, b0:b0 + k]``) —
sent from, or received into, the paged blocks with no copy; otherwise it goes through a pooled
buffer (the sender packs it with ``index_select``, the receiver scatters it on arrival). The
pool hands out blocks lowest-id first, so a request's blocks are mostly consecutive and most
messages are copy-free; copies cost a 2-core machine as much as the transfer itself
(``ecoserve bench kv-transfer`` measures both cases). The tag of message m of transfer s is
``(s * MAX_CHUNKS + m) % 2**31`` (gloo tags are non-negative int32), the header being m = 0.
Both sides must use the same ``group_blocks`` (a mismatch fails the transfer with a size error).

Lost peers. ``abort_peer`` fails every unfinished transfer with a rank that is gone for good
(the coordinator declared it lost); its queued ones are never posted. Posted ops still count
until the backend ends them (gloo fails them as soon as the peer's connection closes).

Deadlines. A transfer not DONE by its deadline becomes TIMED_OUT. Both sides are given the same
absolute deadline (the coordinator's, in SendKV and ReceiveKV), so neither gives up on a transfer
the other still counts on. A sender whose transfer timed out before it was posted sends it hollow,
and its header says so (0 instead of 1): the receiver refuses it (TIMED_OUT, never DONE, nothing
scattered) even if its own clock has not reached the deadline yet, so zeros are never taken for
KV, whatever the two clocks say. A copy-free op still posted
may go on reading or writing the paged blocks, so the caller must keep the transfer's blocks
until ``ops_outstanding(request_id)`` is False, then free them; pooled buffers stay referenced
until their ops finish, and a timed-out receive never scatters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ecoserve.kv_transfer.backend import TransferBackend, TransferError, TransferHandle
from ecoserve.kv_transfer.types import DEFAULT_GROUP_BLOCKS, CompatRecord, TransferPlan, TransferState, TransferUpdate

MAX_CHUNKS = 1 << 14  # messages per transfer at most; spaces out the tags
TAG_SPACE = 2**31
_POOL_MAX_BYTES = 256 << 20  # free CPU chunk buffers kept for reuse, at most


@dataclass
class _Chunk:
    """One message: layer `layer`, K (0) or V (1), logical blocks [g0, g1) of the transfer."""

    layer: int
    kv: int
    g0: int
    g1: int
    buffer: Tensor  # [g1 - g0, block_size, num_kv_heads, head_dim]: a cache view or pooled
    flat: Tensor | None  # pooled storage behind `buffer`; None when `buffer` is a cache view
    handle: TransferHandle | None = None  # None: never posted (posting failed)
    finished: bool = False  # the backend is done with it (completed or failed)


@dataclass
class _Transfer:
    plan: TransferPlan
    is_sender: bool
    block_ids: Tensor  # int64 [n]
    deadline_s: float  # the budget it was given, for messages
    deadline: float  # absolute, on the worker's clock
    state: TransferState = TransferState.QUEUED
    chunks: list[_Chunk] = field(default_factory=list)
    scan_from: int = 0  # chunks before this one are finished
    posted_at: float | None = None  # on the worker's clock

    @property
    def peer(self) -> int:
        return self.plan.dst_rank if self.is_sender else self.plan.src_rank


@dataclass
class _Pair:
    next_seq: int = 0  # the next seq_no this side posts
    queued: dict[int, _Transfer] = field(default_factory=dict)  # by seq_no, not posted yet
    posted: list[_Transfer] = field(default_factory=list)  # backend ops outstanding


class _BufferPool:
    """Reuses flat CPU buffers, in power-of-two sizes: a fresh multi-MB allocation is
    page-faulted in on first touch, which costs about as much as packing into it. (On CUDA
    torch's caching allocator does this already.)"""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._free: dict[int, list[Tensor]] = {}  # numel -> flat buffers
        self._bytes = 0  # held in _free

    def take(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """A flat buffer and its first prod(shape) elements viewed as ``shape``."""
        need = math.prod(shape)
        size = 1 << max(need - 1, 0).bit_length()
        if self._free.get(size):
            flat = self._free[size].pop()
            self._bytes -= flat.nbytes
        else:
            flat = torch.empty(size, dtype=self.dtype, device=self.device)
        return flat, flat[:need].view(shape)

    def give(self, flat: Tensor) -> None:
        if self.device.type == "cpu" and self._bytes + flat.nbytes <= _POOL_MAX_BYTES:
            self._free.setdefault(flat.numel(), []).append(flat)
            self._bytes += flat.nbytes


class KVTransferWorker:
    """Sends or receives request KV blocks of ``kv_cache`` on this rank; progress via ``poll``.

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], contiguous.
    group_blocks: blocks per message (see the module docstring); both sides must agree.
    """

    def __init__(
        self,
        backend: TransferBackend,
        kv_cache: Tensor,
        rank: int,
        *,
        max_in_flight_per_pair: int = 4,
        group_blocks: int = DEFAULT_GROUP_BLOCKS,
        default_deadline_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2 or not kv_cache.is_contiguous():
            raise ValueError(
                "kv_cache must be a contiguous [num_layers, 2, num_blocks, block_size, "
                f"num_kv_heads, head_dim] tensor, got shape {tuple(kv_cache.shape)}"
            )
        if 2 * kv_cache.shape[0] + 1 > MAX_CHUNKS:
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers; at most {MAX_CHUNKS // 2}")
        if max_in_flight_per_pair < 1:
            raise ValueError(f"max_in_flight_per_pair must be >= 1, got {max_in_flight_per_pair}")
        if group_blocks < 1:
            raise ValueError(f"group_blocks must be >= 1, got {group_blocks}")
        if default_deadline_s <= 0:
            raise ValueError(f"default_deadline_s must be > 0, got {default_deadline_s}")
        self.backend, self.kv_cache, self.rank = backend, kv_cache, rank
        self.max_in_flight_per_pair = max_in_flight_per_pair
        self.group_blocks = group_blocks
        self.default_deadline_s, self.clock = default_deadline_s, clock
        self._transfers: dict[str, _Transfer] = {}  # by request_id, until forget()
        self._pairs: dict[tuple[int, int], _Pair] = {}  # by (src_rank, dst_rank)
        self._pool = _BufferPool(kv_cache.dtype, kv_cache.device)
        self._unreported: list[TransferUpdate] = []  # from abort_peer and pump, reported by the next poll
        # KV moved by transfers that ended DONE on this side: bytes, and seconds from posting to done.
        self.moved = {"kv_sent_bytes": 0.0, "kv_sent_seconds": 0.0, "kv_received_bytes": 0.0, "kv_received_seconds": 0.0}

    @property
    def block_size(self) -> int:
        return int(self.kv_cache.shape[3])

    def compat_record(self, model_id: str) -> CompatRecord:
        """What a peer must match to exchange blocks with this worker (checked at registration)."""
        num_layers, _, _, block_size, num_kv_heads, head_dim = self.kv_cache.shape
        dtype = str(self.kv_cache.dtype).removeprefix("torch.")
        return CompatRecord(model_id, dtype, num_layers, num_kv_heads, head_dim, block_size)

    def num_messages(self, num_blocks: int) -> int:
        """Messages a transfer of ``num_blocks`` blocks moves in (the header included)."""
        return 1 + 2 * int(self.kv_cache.shape[0]) * -(-num_blocks // self.group_blocks)

    def send(
        self, plan: TransferPlan, block_ids: list[int], deadline_s: float | None = None,
        deadline: float | None = None,
    ) -> None:
        """Enqueue sending ``plan``'s KV from ``block_ids`` (this rank is the plan's source).

        The blocks are packed when the transfer is posted, in a later ``poll``; free them once
        the transfer is in a terminal state. ``deadline`` is absolute, on this worker's clock,
        and may have passed already (the transfer then times out and is posted hollow in its
        turn); without it the deadline is ``deadline_s`` from now. ``deadline_s`` names the
        budget in messages.
        """
        self._enqueue(plan, block_ids, deadline_s, deadline, is_sender=True)

    def recv(
        self, plan: TransferPlan, block_ids: list[int], deadline_s: float | None = None,
        deadline: float | None = None,
    ) -> None:
        """Enqueue receiving ``plan``'s KV into the caller-allocated ``block_ids`` (deadlines as
        in ``send``: give both sides the same ``deadline``)."""
        self._enqueue(plan, block_ids, deadline_s, deadline, is_sender=False)

    def poll(self) -> list[TransferUpdate]:
        """Make progress without waiting; return the state changes since the last poll."""
        updates, self._unreported = self._unreported, []
        for pair in self._pairs.values():
            self._progress(pair, updates)
        now = self.clock()
        for t in self._transfers.values():
            if not t.state.terminal and now >= t.deadline:
                done = f"{sum(c.finished for c in t.chunks)} of {len(t.chunks)} messages finished"
                message = f"not done within its {t.deadline_s:g} s deadline (was {t.state.value}"
                message += ", never posted)" if t.state is TransferState.QUEUED else f", {done})"
                self._set(t, TransferState.TIMED_OUT, updates, message)
        for pair in self._pairs.values():
            while pair.next_seq in pair.queued and len(pair.posted) < self.max_in_flight_per_pair:
                t = pair.queued.pop(pair.next_seq)
                pair.next_seq += 1
                pair.posted.append(t)
                if t.state is TransferState.QUEUED:
                    self._set(t, TransferState.IN_FLIGHT, updates)
                self._post(t, updates)
        return updates

    def pump(self) -> None:
        """Make progress as ``poll`` does, keeping the updates for the next ``poll``: for a caller
        that cannot act on them now, e.g. in the middle of an engine step (the blocks a transfer
        touches are never the step's)."""
        self._unreported = self.poll()

    def abort_peer(self, peer: int, message: str) -> None:
        """Fail every unfinished transfer with rank ``peer`` (lost for good); the next ``poll``
        reports them. Queued ones are dropped unposted; free a transfer's blocks, as always,
        once ``ops_outstanding`` is False."""
        for (src, dst), pair in self._pairs.items():
            if peer in (src, dst):
                for t in [*pair.queued.values(), *pair.posted]:
                    self._set(t, TransferState.FAILED, self._unreported, message)
                pair.queued.clear()

    def state(self, request_id: str) -> TransferState:
        return self._get(request_id).state

    def ops_outstanding(self, request_id: str) -> bool:
        """Whether a backend op of the transfer may still touch its blocks (free them after)."""
        return any(not c.finished and c.handle is not None for c in self._get(request_id).chunks)

    def forget(self, request_id: str) -> None:
        """Drop a transfer whose terminal state the caller has read (it keeps its seq slot)."""
        t = self._get(request_id)
        if not t.state.terminal:
            raise ValueError(
                f"request {request_id!r} is {t.state.value}; only transfers in a terminal "
                "state (done, failed, timed_out) can be forgotten"
            )
        del self._transfers[request_id]

    @property
    def num_in_flight(self) -> int:
        """Transfers posted whose backend ops have not all finished (timed-out ones included)."""
        return sum(len(p.posted) for p in self._pairs.values())

    def assert_no_leaks(self) -> None:
        """Fail when a transfer is still tracked, queued or holding backend ops."""
        queued = sum(len(p.queued) for p in self._pairs.values())
        if self._transfers or queued or self.num_in_flight:
            raise AssertionError(
                f"rank {self.rank}: {len(self._transfers)} transfers not forgotten "
                f"({sorted(self._transfers)}), {queued} queued, {self.num_in_flight} in flight"
            )

    def _get(self, request_id: str) -> _Transfer:
        if request_id not in self._transfers:
            raise KeyError(f"rank {self.rank} has no transfer for request {request_id!r}")
        return self._transfers[request_id]

    def _enqueue(
        self, plan: TransferPlan, block_ids: list[int], deadline_s: float | None, deadline: float | None,
        is_sender: bool,
    ) -> None:
        role, mine = ("send", plan.src_rank) if is_sender else ("recv", plan.dst_rank)
        if mine != self.rank:
            raise ValueError(
                f"plan {plan.request_id!r} goes {plan.src_rank} -> {plan.dst_rank}; {role}() "
                f"belongs on rank {mine}, this worker is rank {self.rank}"
            )
        if plan.request_id in self._transfers:
            raise ValueError(
                f"request {plan.request_id!r} already has a transfer on rank {self.rank} "
                f"({self._transfers[plan.request_id].state.value}); forget() it first"
            )
        need, num_blocks = plan.num_blocks(self.block_size), int(self.kv_cache.shape[2])
        if len(block_ids) != need:
            raise ValueError(
                f"{plan.num_tokens} tokens need {need} blocks of {self.block_size}, "
                f"got {len(block_ids)} block ids"
            )
        if len(set(block_ids)) != need or not all(0 <= b < num_blocks for b in block_ids):
            raise ValueError(
                f"block_ids must be distinct and in [0, {num_blocks}), got {block_ids}"
            )
        pair = self._pairs.setdefault((plan.src_rank, plan.dst_rank), _Pair())
        if plan.seq_no < pair.next_seq or plan.seq_no in pair.queued:
            raise ValueError(
                f"seq_no {plan.seq_no} of pair {plan.src_rank} -> {plan.dst_rank} was already "
                f"enqueued on rank {self.rank}; each seq_no is used once"
            )
        deadline_s = self.default_deadline_s if deadline_s is None else deadline_s
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0 seconds, got {deadline_s}")
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.kv_cache.device)  # [n]
        t = _Transfer(plan, is_sender, ids, deadline_s, self.clock() + deadline_s if deadline is None else deadline)
        pair.queued[plan.seq_no] = t
        self._transfers[plan.request_id] = t

    def _post(self, t: _Transfer, updates: list[TransferUpdate]) -> None:
        # A transfer already terminal here timed out while queued: post it hollow, through
        # pooled buffers only (its blocks may already belong to someone else).
        hollow = t.state.terminal
        ids = t.block_ids.tolist()
        n, g = len(ids), self.group_blocks
        tail = tuple(self.kv_cache.shape[3:])  # (block_size, num_kv_heads, head_dim)
        # The header, message 0: the sender's 1 (real KV follows) or 0 (hollow); -1 until received.
        header = torch.full((1,), -1 if not t.is_sender else 0 if hollow else 1, dtype=torch.int64,
                            device=self.kv_cache.device)
        t.chunks.append(_Chunk(-1, -1, 0, 0, header, None))
        t.posted_at = self.clock()
        for layer in range(int(self.kv_cache.shape[0])):
            for kv in (0, 1):
                for g0 in range(0, n, g):
                    g1 = min(n, g0 + g)
                    b0 = ids[g0]
                    if not hollow and ids[g0:g1] == list(range(b0, b0 + g1 - g0)):
                        view = self.kv_cache[layer, kv, b0 : b0 + g1 - g0]  # copy-free
                        t.chunks.append(_Chunk(layer, kv, g0, g1, view, None))
                    else:
                        flat, buf = self._pool.take((g1 - g0, *tail))
                        t.chunks.append(_Chunk(layer, kv, g0, g1, buf, flat))
        for m, chunk in enumerate(t.chunks):
            tag = (t.plan.seq_no * MAX_CHUNKS + m) % TAG_SPACE
            try:
                if t.is_sender:
                    if hollow and m > 0:
                        chunk.buffer.zero_()
                    elif chunk.flat is not None:
                        torch.index_select(
                            self.kv_cache[chunk.layer, chunk.kv], 0, t.block_ids[chunk.g0 : chunk.g1], out=chunk.buffer
                        )
                    chunk.handle = self.backend.isend(chunk.buffer, t.peer, tag)
                else:
                    chunk.handle = self.backend.irecv(chunk.buffer, t.peer, tag)
            except (TransferError, RuntimeError) as exc:
                # the pair is broken; the remaining messages are never posted
                for rest in t.chunks[m:]:
                    rest.finished = True
                self._set(t, TransferState.FAILED, updates, f"posting message {m} failed: {exc}")
                return

    def _progress(self, pair: _Pair, updates: list[TransferUpdate]) -> None:
        for t in list(pair.posted):
            # A pair's messages complete in posting order (one connection per direction), so
            # the scan stops at the first unfinished one: a poll costs O(1), not O(messages).
            while t.scan_from < len(t.chunks):
                chunk = t.chunks[t.scan_from]
                if not chunk.finished and chunk.handle is not None:
                    try:
                        if not chunk.handle.is_completed():
                            break
                    except TransferError as exc:
                        chunk.finished = True
                        self._set(t, TransferState.FAILED, updates, str(exc))
                        t.scan_from += 1
                        continue
                    chunk.finished = True
                    if not t.is_sender and t.scan_from == 0 and t.state is TransferState.IN_FLIGHT:
                        self._check_header(t, chunk, updates)
                    if not t.is_sender and chunk.flat is not None and t.state is TransferState.IN_FLIGHT:
                        dst = self.kv_cache[chunk.layer, chunk.kv]  # [num_blocks, block_size, H, D]
                        dst.index_copy_(0, t.block_ids[chunk.g0 : chunk.g1], chunk.buffer)
                t.scan_from += 1
            if t.scan_from == len(t.chunks):
                pair.posted.remove(t)
                if t.state is TransferState.IN_FLIGHT:
                    self._count_moved(t)
                for chunk in t.chunks:
                    if chunk.flat is not None:
                        self._pool.give(chunk.flat)
                t.chunks.clear()
                if t.state is TransferState.IN_FLIGHT:
                    self._set(t, TransferState.DONE, updates)

    def _count_moved(self, t: _Transfer) -> None:
        side = "sent" if t.is_sender else "received"
        self.moved[f"kv_{side}_bytes"] += sum(c.buffer.nbytes for c in t.chunks[1:])  # the header is no KV
        if t.posted_at is not None:
            self.moved[f"kv_{side}_seconds"] += max(0.0, self.clock() - t.posted_at)

    def _check_header(self, t: _Transfer, header: _Chunk, updates: list[TransferUpdate]) -> None:
        """Refuse a transfer its sender posted hollow: it gave up on it before sending any KV."""
        flag = int(header.buffer.item())
        if flag != 1:
            why = "posted it hollow, its deadline having passed before its turn" if flag == 0 else f"sent header {flag}"
            self._set(t, TransferState.TIMED_OUT, updates,
                      f"refused: sender rank {t.peer} {why}; nothing of it is taken for KV")

    def _set(
        self, t: _Transfer, state: TransferState, updates: list[TransferUpdate], message: str = ""
    ) -> None:
        if t.state.terminal:
            return  # the first terminal state sticks
        t.state = state
        updates.append(TransferUpdate(t.plan.request_id, state, message))


__all__ = ["DEFAULT_CHUNK_BYTES", "KVTransferWorker", "MAX_CHUNKS"]

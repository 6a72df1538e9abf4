"""Point-to-point tensor transport under the KV transfer: torch.distributed, or an in-process fake.

A backend posts sends and receives and hands back handles polled with ``is_completed()``, which
never blocks and raises ``TransferError`` when the op failed. Sends and receives are matched by
(peer, tag) in posting order. NCCL ignores tags and matches purely by posting order, which is
why both sides of a pair must post their ops in the same order (the worker posts by seq_no).
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch.distributed as dist
from torch import Tensor


class TransferError(RuntimeError):
    """A posted send or receive failed in the backend."""


class TransferHandle(Protocol):
    def is_completed(self) -> bool:
        """True once the op finished; never blocks; raises ``TransferError`` if it failed."""
        ...


class TransferBackend(Protocol):
    def isend(self, tensor: Tensor, peer: int, tag: int) -> TransferHandle:
        """Post a send of the contiguous ``tensor`` to rank ``peer``; keep it unchanged and
        alive until the handle completes."""
        ...

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> TransferHandle:
        """Post a receive into the contiguous ``tensor`` from rank ``peer``."""
        ...


# --- torch.distributed ------------------------------------------------------------------------


class _GlooOp:
    """A gloo send or receive, finished by a lane thread (see ``_Lane``).

    In torch 2.13 a gloo send/recv ``Work`` reports ``is_completed() == False`` until someone
    calls ``wait()``, and ``get_future()`` raises "not implemented" for P2P ops, so ``wait()``
    is the only way to observe completion; it releases the GIL, so the lane thread blocks in it
    while the caller polls a flag here.
    """

    def __init__(self, post: Callable[[], dist.Work | None]) -> None:
        self._post = post
        self._work: dist.Work | None = None
        self._error: str | None = None
        self._done = False

    def start_on_lane(self) -> None:
        try:
            self._work = self._post()
            if self._work is None:
                raise TransferError("this rank is not in the process group")
        except Exception as exc:  # noqa: BLE001 - every backend error becomes TransferError
            self._error = f"{type(exc).__name__}: {exc}"
            self._done = True

    def finish_on_lane(self) -> None:
        if self._done:
            return
        try:
            assert self._work is not None
            self._work.wait()
        except Exception as exc:  # noqa: BLE001 - every backend error becomes TransferError
            self._error = f"{type(exc).__name__}: {exc}"
        self._done = True  # set after _error, so a reader that sees _done also sees the error

    def is_completed(self) -> bool:
        if not self._done:
            return False
        if self._error is not None:
            raise TransferError(self._error)
        return True


class _PolledWork:
    """An NCCL ``Work``: ``is_completed()`` queries its CUDA event without blocking and turns
    true on success or error; ``wait()`` then returns at once (after ordering the current stream
    behind the op) or raises the op's error."""

    def __init__(self, work: dist.Work | None) -> None:
        if work is None:
            raise TransferError("this rank is not in the process group")
        self._work = work
        self._done = False

    def is_completed(self) -> bool:
        if self._done:
            return True
        if not self._work.is_completed():
            return False
        try:
            self._work.wait()
        except Exception as exc:  # noqa: BLE001
            raise TransferError(f"{type(exc).__name__}: {exc}") from exc
        self._done = True
        return True


class _Lane:
    """A daemon thread that runs the gloo ops of one (peer, direction) in posting order.

    Ops of one direction to one peer travel over one connection in posting order, so they
    complete in that order and finishing them FIFO delays no report. The lane posts every op
    queued at the moment before it waits on any, so a transfer's messages travel together. A hung op (a lost peer)
    blocks only the later ops of its own peer and direction, which are stuck behind it anyway.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_GlooOp | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: _GlooOp) -> None:
        self._queue.put(op)

    def stop(self, timeout_s: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        # Post every op waiting now, then wait on them in order: the messages of a transfer
        # are in flight together rather than one round trip each.
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            ops = [op for op in batch if op is not None]
            for op in ops:
                op.start_on_lane()
            for op in ops:
                op.finish_on_lane()


class TorchDistBackend:
    """``torch.distributed.isend`` / ``irecv`` on ``group`` (default: the default process group,
    which the caller has set up with ``init_process_group``).

    Gloo (CPU tensors) matches by tag. When the peer's receive is already posted, gloo's TCP
    transport writes a message in the thread that calls ``isend`` before returning, so posting
    sends from the caller would serialise packing and sending; a send lane per peer posts (then
    waits on) the sends in order instead, and ``isend`` returns at once. Receives are posted on
    the caller's thread (that only tells the peer where to write; gloo's loop thread reads the
    data) and a receive lane per peer waits on them.

    NCCL (CUDA tensors) ignores tags, so correctness there rests on both sides posting in the
    same order; its ``Work.is_completed()`` polls a CUDA event, so no threads are needed.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "TorchDistBackend needs torch.distributed.init_process_group() to have run first"
            )
        self._group = group
        self._lanes: dict[tuple[int, str], _Lane] = {}

    def isend(self, tensor: Tensor, peer: int, tag: int) -> TransferHandle:
        def post() -> dist.Work | None:
            return dist.isend(tensor, dst=peer, group=self._group, tag=tag)

        if tensor.is_cuda:
            return _PolledWork(post())
        return self._on_lane(_GlooOp(post), peer, "send")

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> TransferHandle:
        work = dist.irecv(tensor, src=peer, group=self._group, tag=tag)
        if tensor.is_cuda:
            return _PolledWork(work)
        return self._on_lane(_GlooOp(lambda: work), peer, "recv")

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the lane threads (those stuck on a hung op are daemons and are left behind)."""
        for lane in self._lanes.values():
            lane.stop(timeout_s)
        self._lanes.clear()

    def _on_lane(self, op: _GlooOp, peer: int, kind: str) -> TransferHandle:
        key = (peer, kind)
        if key not in self._lanes:
            self._lanes[key] = _Lane(f"kv-transfer-{kind}-{peer}")
        self._lanes[key].submit(op)
        return op


# --- in-process fake for tests ----------------------------------------------------------------


@dataclass(frozen=True)
class PostedOp:
    """One op as the fake hub saw it, in posting order."""

    kind: Literal["send", "recv"]
    src: int
    dst: int
    tag: int
    numel: int


@dataclass
class _FakeHandle:
    tensor: Tensor
    done: bool = False
    error: str | None = None

    def is_completed(self) -> bool:
        if self.error is not None:
            raise TransferError(self.error)
        return self.done


class FakeHub:
    """Matches sends and receives posted by ``FakeBackend``s in one process.

    Ops are matched by (src, dst, tag) in posting order; the data is copied when the second of
    a pair is posted and both handles complete then. ``drop(src, dst)`` makes the pair's later
    ops never complete (a lost peer); ``fail(src, dst, message)`` makes them fail.
    """

    def __init__(self) -> None:
        self.posted: list[PostedOp] = []  # every op, in posting order
        self._sends: defaultdict[tuple[int, int, int], deque[_FakeHandle]] = defaultdict(deque)
        self._recvs: defaultdict[tuple[int, int, int], deque[_FakeHandle]] = defaultdict(deque)
        self._dropped: set[tuple[int, int]] = set()
        self._failing: dict[tuple[int, int], str] = {}
        self._black_hole: list[_FakeHandle] = []  # ops of dropped pairs, kept alive

    def drop(self, src: int, dst: int) -> None:
        self._dropped.add((src, dst))

    def fail(self, src: int, dst: int, message: str = "injected failure") -> None:
        self._failing[(src, dst)] = message

    def num_unmatched(self) -> int:
        """Ops posted and still waiting for their partner (dropped ones excluded)."""
        return sum(len(q) for q in self._sends.values()) + sum(len(q) for q in self._recvs.values())

    def post(
        self, kind: Literal["send", "recv"], src: int, dst: int, tag: int, tensor: Tensor
    ) -> _FakeHandle:
        self.posted.append(PostedOp(kind, src, dst, tag, tensor.numel()))
        handle = _FakeHandle(tensor)
        if (src, dst) in self._failing:
            handle.error = self._failing[(src, dst)]
            return handle
        if (src, dst) in self._dropped:
            self._black_hole.append(handle)
            return handle
        key = (src, dst, tag)
        mine, theirs = (self._sends, self._recvs) if kind == "send" else (self._recvs, self._sends)
        if not theirs[key]:
            mine[key].append(handle)
            return handle
        other = theirs[key].popleft()
        send, recv = (handle, other) if kind == "send" else (other, handle)
        if send.tensor.numel() != recv.tensor.numel() or send.tensor.dtype != recv.tensor.dtype:
            send.error = recv.error = (
                f"size mismatch on {src} -> {dst} tag {tag}: sent {send.tensor.numel()} "
                f"{send.tensor.dtype}, receive buffer holds {recv.tensor.numel()} "
                f"{recv.tensor.dtype}"
            )
            return handle
        recv.tensor.copy_(send.tensor.view(recv.tensor.shape))
        send.done = recv.done = True
        return handle


class FakeBackend:
    """The ``TransferBackend`` of rank ``rank`` on a ``FakeHub``."""

    def __init__(self, hub: FakeHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank

    def isend(self, tensor: Tensor, peer: int, tag: int) -> TransferHandle:
        return self.hub.post("send", self.rank, peer, tag, tensor)

    def irecv(self, tensor: Tensor, peer: int, tag: int) -> TransferHandle:
        return self.hub.post("recv", peer, self.rank, tag, tensor)


__all__ = [
    "FakeBackend",
    "FakeHub",
    "PostedOp",
    "TorchDistBackend",
    "TransferBackend",
    "TransferError",
    "TransferHandle",
]

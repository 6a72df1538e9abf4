"""Frames to ROUTER peers that are not reading: kept in order, bounded, sent later.

The server keeps one outbox for clients (bounded) and one for workers (never bounded: no frame
to a worker is optional).

The front ROUTER sends with ROUTER_MANDATORY and NOBLOCK, so a full pipe to one client raises
`zmq.Again` instead of silently dropping the frame (ZeroMQ's default), and a client that is gone
raises EHOSTUNREACH. A client whose pipe is full gets a queue here; everything later for it
joins the queue, in order, until `flush` has sent it all. A ROUTER's writability is not per
peer, so `flush` simply retries each queue's head; the server calls it every few milliseconds
while any queue is non-empty. A client with no queue is sent to directly.

The bound (`max_queued_bytes`, CoordinatorConfig.max_queued_bytes_per_client) applies to token
deltas only: a delta that would take a queue past it is refused (`Sent.OVER`), and the server
then ends that client's requests with "client_too_slow". Every other frame, terminal events
above all, is always queued.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import NamedTuple

import zmq
import zmq.asyncio


class Sent(enum.Enum):
    SENT = "sent"  # handed to ZeroMQ
    QUEUED = "queued"  # kept here until the client reads
    OVER = "over"  # a delta past the bound: not kept
    GONE = "gone"  # the client's connection is gone: nothing kept


class Queued(NamedTuple):
    frame: bytes
    delta_of: str | None  # the client request id of a TokenDelta; None for every other frame


class Outbox:
    def __init__(self, sock: zmq.asyncio.Socket, max_queued_bytes: int) -> None:
        self.sock = sock
        self.max_queued_bytes = max_queued_bytes
        self.queues: dict[bytes, deque[Queued]] = {}  # client routing id -> frames not yet sent, in order
        self.bytes: dict[bytes, int] = {}  # client routing id -> bytes in its queue
        self.pending = asyncio.Event()  # set while any queue is non-empty

    def send(self, client: bytes, frame: bytes, delta_of: str | None = None) -> Sent:
        queue = self.queues.get(client)
        if queue is None:  # the common path: nothing waiting, send now
            result = self._try(client, frame)
            if result is not Sent.QUEUED:
                return result
            queue = self.queues[client] = deque()
            self.bytes[client] = 0
            self.pending.set()
        elif delta_of is not None and self.bytes[client] + len(frame) > self.max_queued_bytes:
            return Sent.OVER
        queue.append(Queued(frame, delta_of))
        self.bytes[client] += len(frame)
        return Sent.QUEUED

    def offer(self, peer: bytes, frame: bytes) -> Sent:
        """Send `frame` now if nothing waits for `peer` and its pipe takes it; never queue it.
        SENT, GONE, or OVER: not sent, dropped."""
        if peer in self.queues:
            return Sent.OVER
        result = self._try(peer, frame)
        return Sent.OVER if result is Sent.QUEUED else result

    def drop_deltas(self, client: bytes, request_ids: set[str]) -> None:
        """Drop the queued deltas of `request_ids` (requests ended for being too slow)."""
        queue = self.queues.get(client)
        if queue is None:
            return
        kept = deque(q for q in queue if q.delta_of not in request_ids)
        self.queues[client] = kept
        self.bytes[client] = sum(len(q.frame) for q in kept)
        if not kept:
            self.forget(client)

    def flush(self) -> list[bytes]:
        """Send what each client's pipe takes now; the clients found gone (their queues dropped)."""
        gone = []
        for client, queue in list(self.queues.items()):
            result = Sent.SENT
            while queue:
                result = self._try(client, queue[0].frame)
                if result is Sent.QUEUED:
                    break
                if result is Sent.GONE:
                    gone.append(client)
                    break
                self.bytes[client] -= len(queue.popleft().frame)
            if not queue or result is Sent.GONE:
                self.forget(client)
        return gone

    def forget(self, client: bytes) -> None:
        self.queues.pop(client, None)
        self.bytes.pop(client, None)
        if not self.queues:
            self.pending.clear()

    def queued_frames(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def queued_bytes(self) -> int:
        return sum(self.bytes.values())

    def _try(self, client: bytes, frame: bytes) -> Sent:
        try:
            self.sock.send_multipart([client, frame], zmq.NOBLOCK).result()  # type: ignore[attr-defined]
        except zmq.Again:  # its pipe is full
            return Sent.QUEUED
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return Sent.GONE
            raise
        return Sent.SENT

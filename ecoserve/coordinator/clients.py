"""Client connections the front door has seen close: their requests are aborted everywhere.

ZeroMQ's ROUTER does not tell the application when a peer goes away, so a socket monitor
reports each closed connection by its file descriptor, and the descriptor a client's messages
arrive on (`zmq.SRCFD`) ties it to the client's routing id. Descriptors are reused, so the
order matters: libzmq queues a connection's DISCONNECTED event before it closes the descriptor,
hence before a new connection can reuse it and send anything. Draining the monitor before each
batch of front-door messages (`drain`) therefore handles an old connection's close before the
first message of a new one on the same descriptor.
"""

from __future__ import annotations

import logging
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)


class ClientWatch:
    def __init__(self, front: zmq.asyncio.Socket, on_gone: Callable[[bytes], None]) -> None:
        self.front = front
        self.monitor = front.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.on_gone = on_gone
        self.fd_of: dict[bytes, int] = {}  # client routing id -> descriptor of its connection
        self.on_fd: dict[int, set[bytes]] = {}

    def saw(self, client: bytes, frame: zmq.Frame) -> None:
        """A message from `client` arrived as `frame` (received with copy=False)."""
        if client not in self.fd_of:
            fd = int(frame.get(zmq.SRCFD))
            self.fd_of[client] = fd
            self.on_fd.setdefault(fd, set()).add(client)

    def drain(self) -> None:
        """Handle every close reported so far, without waiting."""
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK).result()  # type: ignore[attr-defined]
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for client in self.on_fd.pop(int(event["value"]), set()):
                    del self.fd_of[client]
                    self.on_gone(client)

    async def run(self) -> None:
        while True:
            await self.monitor.poll()
            self.drain()

    def close(self) -> None:
        self.front.disable_monitor()
        self.monitor.close(linger=0)

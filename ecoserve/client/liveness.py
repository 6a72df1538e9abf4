"""Whether the client's server is still there: ZeroMQ's own heartbeats plus a socket monitor.

The DEALER sends a ZMTP PING every `heartbeat_interval(timeout)` seconds and the server's ZeroMQ
I/O thread answers it (no application code runs, so a server busy for seconds still answers).
libzmq closes the connection when nothing at all arrived within `timeout` seconds (a frozen host,
a lost network), and at once when the peer closes it (a killed process: the kernel closes its
sockets). The monitor reports that close; the client then fails every pending call with
`RequestError("server_unreachable", ...)`. The DEALER would reconnect by itself, but the server
dropped this client's requests with the old connection (coordinator/clients.py), so nothing
could resume there.
"""

from __future__ import annotations

import math
import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ecoserve.client.types import RequestError

DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
MIN_HEARTBEAT_TIMEOUT_S = 0.1
MAX_HEARTBEAT_TIMEOUT_S = 3600.0  # HEARTBEAT_TTL travels as 16-bit deciseconds (at most 6553.5 s)
HEARTBEAT_INTERVAL_S = 1.0


def check_heartbeat_timeout(value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not MIN_HEARTBEAT_TIMEOUT_S <= value <= MAX_HEARTBEAT_TIMEOUT_S
    ):
        raise ValueError(
            f"heartbeat_timeout must be a number of seconds from {MIN_HEARTBEAT_TIMEOUT_S} to "
            f"{MAX_HEARTBEAT_TIMEOUT_S:g} (default {DEFAULT_HEARTBEAT_TIMEOUT_S:g}): how long the server may "
            f"stay silent, heartbeats included, before the client declares it unreachable; got {value!r}"
        )


def heartbeat_interval(timeout: float) -> float:
    """Seconds between PINGs: 1 s, or a quarter of a shorter timeout."""
    return min(HEARTBEAT_INTERVAL_S, timeout / 4)


class ServerWatch:
    """Heartbeats and a monitor on one client socket; create it before `sock.connect`."""

    def __init__(self, sock: zmq.asyncio.Socket, address: str, timeout: float) -> None:
        check_heartbeat_timeout(timeout)
        self.address, self.timeout = address, timeout
        interval = heartbeat_interval(timeout)
        # A PING goes out at most `interval` after the last thing received and libzmq gives up
        # `timeout - interval` after a PING, so the connection closes at most `timeout` after
        # the server last sent anything. TTL asks the server to drop us after as long a silence.
        sock.setsockopt(zmq.HEARTBEAT_IVL, round(interval * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, round((timeout - interval) * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, round(timeout * 1000))
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.last_heard = time.monotonic()  # the last message from the server
        self.silent_s = 0.0  # how long it had been silent when its connection closed
        self._connected = False
        self._lost = False

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def connected(self) -> None:
        """The handshake reply arrived: from now on any close of the connection is fatal.

        Closes before that were failed attempts (a server still binding, a key being checked)
        followed by a success; only a close after the last success counts.
        """
        self.heard()
        up = True
        for event in self._events():
            up = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        self._connected = True
        if not up:
            self._set_lost()

    def lost(self) -> bool:
        """Whether the connection closed; reads what the monitor reported so far, without waiting."""
        if self._connected:
            for event in self._events():
                if event == zmq.EVENT_DISCONNECTED:
                    self._set_lost()
        return self._lost

    def error(self) -> RequestError:
        return RequestError(
            "server_unreachable",
            f"the ecoserve server at {self.address} is unreachable: its connection closed (the server exited or "
            f"was killed) or it answered no heartbeat within {self.timeout:g}s; nothing was heard from it for the "
            f"last {self.silent_s:.1f}s. Calls in flight there are lost; connect a new client once it is back",
        )

    def close(self) -> None:
        if not self.monitor.closed:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)

    def _set_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self.silent_s = time.monotonic() - self.last_heard

    def _events(self) -> list[int]:
        events: list[int] = []
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK).result()  # type: ignore[attr-defined]
            except zmq.Again:
                return events
            events.append(int(parse_monitor_message(frames)["event"]))

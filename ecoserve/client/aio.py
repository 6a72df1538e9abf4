"""The asyncio client: one ZeroMQ DEALER socket to the coordinator (import it from `ecoserve.client`).

    async with AsyncClient("tcp://127.0.0.1:5555") as client:
        print((await client.generate("The capital of France is", SamplingParams(max_tokens=8))).text)

One receive task per client routes replies by request id into per-request queues, so any number
of requests can be in flight on one client. A call that stops waiting before its request's
terminal event (timeout, cancellation, a stream left early) aborts the request on the server.
When the server dies or becomes unreachable, every pending call fails within `heartbeat_timeout`
seconds with `RequestError` code "server_unreachable" (liveness.py), whatever its own timeout.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import uuid
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from typing import Union

import zmq
import zmq.asyncio

from ecoserve import protocol
from ecoserve.auth import ClientKeys, load_client_keys
from ecoserve.client.liveness import DEFAULT_HEARTBEAT_TIMEOUT_S, ServerWatch, check_heartbeat_timeout
from ecoserve.client.types import SLO, Completion, Delta, RequestError, ServerInfo, check_timeout, make_add_request
from ecoserve.params import SamplingParams

__all__ = ["AsyncClient", "AsyncStream"]

_log = logging.getLogger(__name__)
# What a request's queue holds: its replies, or the error that ended the whole client.
_Event = Union[protocol.TokenDelta, protocol.RequestFinished, protocol.ErrorReply, BaseException]
AuthKeys = Union[str, "os.PathLike[str]", ClientKeys, None]  # a key folder (its "client" pair) or loaded keys


class _Request:
    """One request as its caller sees it: the reply queue, the deadline, whether it ended."""

    def __init__(self, client: AsyncClient, add: protocol.AddRequest, timeout: float | None) -> None:
        self.client, self.add, self.timeout = client, add, timeout
        self.queue: asyncio.Queue[_Event] = asyncio.Queue()
        self.deadline: float | None = None
        self.finished = False

    async def start(self) -> None:
        if self.timeout is not None:
            self.deadline = asyncio.get_running_loop().time() + self.timeout
        self.client._requests[self.add.request_id] = self.queue
        await self.client._send(self.add)

    async def next(self) -> Delta | Completion:
        """The next delta, or the completion; raises on an error or when the deadline passes."""
        rid = self.add.request_id
        if self.queue.empty():
            now = asyncio.get_running_loop().time()
            remaining = None if self.deadline is None else max(0.0, self.deadline - now)
            try:
                event = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"request {rid} did not finish within its timeout of {self.timeout}s; the client stopped "
                    f"waiting and asked the server to abort it"
                ) from None
        else:
            event = self.queue.get_nowait()  # already here: a reply beats a deadline that just passed
        if isinstance(event, protocol.TokenDelta):
            return Delta(event.request_id, event.index, event.token_ids, event.text)
        self.finished = True
        if isinstance(event, BaseException):
            raise copy.copy(event)
        if isinstance(event, protocol.ErrorReply):
            raise RequestError(event.code, event.message, rid)
        return Completion.from_message(event)

    def close(self) -> None:
        self.client._requests.pop(self.add.request_id, None)
        if not self.finished:
            self.client._send_nowait(protocol.AbortRequest(self.add.request_id))


class AsyncStream:
    """The deltas of one streamed request; `completion` is set when the iteration ends normally.

    It can be iterated once. Leaving early (break, `aclose()`, cancellation, leaving `async with`)
    aborts the request on the server.
    """

    def __init__(self, request: _Request) -> None:
        self._request = request
        self._iterator: weakref.ref[AsyncGenerator[Delta, None]] | None = None
        self._used = False
        self.completion: Completion | None = None

    @property
    def request_id(self) -> str:
        return self._request.add.request_id

    def __aiter__(self) -> AsyncGenerator[Delta, None]:
        if self._used:
            raise RuntimeError(f"stream {self.request_id} was already iterated or closed; a stream is read once")
        self._used = True
        # A weak reference only: a `break` then drops the generator, whose finaliser aborts.
        iterator = self._iterate()
        self._iterator = weakref.ref(iterator)
        return iterator

    async def _iterate(self) -> AsyncGenerator[Delta, None]:
        try:
            await self._request.start()
            while True:
                event = await self._request.next()
                if isinstance(event, Completion):
                    self.completion = event
                    return
                yield event
        finally:
            self._request.close()

    async def aclose(self) -> None:
        self._used = True
        iterator = self._iterator() if self._iterator is not None else None
        if iterator is not None:
            await iterator.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncClient:
    """An asyncio client: `await AsyncClient.connect(address)` or `async with AsyncClient(address)`.

    `timeout`: seconds to wait for the handshake. `auth_keys` (a server started with `--auth
    curve`): the folder `ecoserve keys generate` made (its server.pub, client.pub and client.key),
    or `ecoserve.auth.load_client_keys(folder, name)`. `heartbeat_timeout` (seconds, default 10,
    from 0.1 to 3600): the server is declared unreachable, and every pending call fails with
    `RequestError` code "server_unreachable", once its connection closes or it has sent nothing,
    not even a heartbeat reply, for this long. Heartbeats go out every second and the server's
    ZeroMQ I/O thread answers them, so a server that is merely busy is not declared dead.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 10.0,
        client_name: str = "ecoserve-client",
        auth_keys: AuthKeys = None,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    ) -> None:
        check_timeout("timeout", timeout)
        check_heartbeat_timeout(heartbeat_timeout)
        self.heartbeat_timeout = heartbeat_timeout
        self.address = address
        self.auth_keys = auth_keys if auth_keys is None or isinstance(auth_keys, ClientKeys) else load_client_keys(auth_keys)
        self.client_name = client_name
        self.server_name: str | None = None
        self.server_info: ServerInfo | None = None  # set by the handshake
        self._connect_timeout = timeout
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._watch: ServerWatch | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._requests: dict[str, asyncio.Queue[_Event]] = {}
        # Stats replies carry no id: the server answers GetStats in order, so waiters form a FIFO.
        # A waiter that gave up stays queued (cancelled) so that later replies stay aligned.
        self._stats: deque[asyncio.Future[dict[str, float]]] = deque()
        self._error: BaseException | None = None  # set once closed or broken; later calls raise it

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        timeout: float = 10.0,
        client_name: str = "ecoserve-client",
        auth_keys: AuthKeys = None,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    ) -> AsyncClient:
        client = cls(
            address, timeout=timeout, client_name=client_name, auth_keys=auth_keys, heartbeat_timeout=heartbeat_timeout
        )
        await client._connect()
        return client

    async def __aenter__(self) -> AsyncClient:
        if self._sock is None:
            await self._connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        slo: SLO | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run one request to its end; `timeout` (seconds, None = no limit) aborts it when it expires."""
        request = self._new_request(prompt, params, slo, timeout, stream=False)
        try:
            await request.start()
            while True:
                event = await request.next()
                if isinstance(event, Completion):
                    return event
        finally:
            request.close()

    def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        slo: SLO | None = None,
        timeout: float | None = None,
    ) -> AsyncStream:
        """A stream of the request's deltas; the request is sent when the iteration starts."""
        return AsyncStream(self._new_request(prompt, params, slo, timeout, stream=True))

    async def generate_many(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | None = None,
        *,
        slo: SLO | None = None,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Run all prompts concurrently; the first failure cancels (and aborts) the rest."""
        tasks = [asyncio.ensure_future(self.generate(p, params, slo=slo, timeout=timeout)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def abort(self, request_id: str) -> bool:
        """Abort an in-flight request: its caller gets a Completion with finish_reason "abort".

        Returns False when no request with that id is in flight on this client.
        """
        self._check_open()
        if request_id not in self._requests:
            return False
        await self._send(protocol.AbortRequest(request_id))
        return True

    async def stats(self, *, timeout: float | None = None) -> dict[str, float]:
        """The server's current counters and gauges."""
        check_timeout("timeout", timeout)
        self._check_open()
        waiter: asyncio.Future[dict[str, float]] = asyncio.get_running_loop().create_future()
        self._stats.append(waiter)
        await self._send(protocol.GetStats())
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no stats reply from {self.address} within {timeout}s") from None

    async def close(self) -> None:
        """Abort what is in flight, fail its waiters and close the socket; closing twice is fine."""
        for request_id in list(self._requests):
            self._send_nowait(protocol.AbortRequest(request_id))
        receiver = self._receiver
        self._shutdown(ConnectionError(f"the client for {self.address} is closed"))
        if receiver is not None and receiver is not asyncio.current_task():
            await asyncio.wait([receiver])

    # --- internals ---------------------------------------------------------------------------

    def _new_request(
        self, prompt: str | list[int], params: SamplingParams | None, slo: SLO | None, timeout: float | None, stream: bool
    ) -> _Request:
        check_timeout("timeout", timeout)
        self._check_open()
        return _Request(self, make_add_request(uuid.uuid4().hex, prompt, params, slo, stream), timeout)

    def _check_open(self) -> None:
        if self._error is not None:
            raise copy.copy(self._error)
        if self._sock is None:
            raise RuntimeError(
                "the client is not connected; use `await AsyncClient.connect(address)` or `async with AsyncClient(address)`"
            )

    async def _connect(self) -> None:
        if self._sock is not None or self._error is not None:
            raise RuntimeError(f"the client for {self.address} was already connected; make a new one")
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.auth_keys is not None:  # CURVE: the server proves its key, we prove ours
            sock.curve_serverkey = self.auth_keys.server_public
            sock.curve_publickey = self.auth_keys.public
            sock.curve_secretkey = self.auth_keys.secret
        watch = ServerWatch(sock, self.address, self.heartbeat_timeout)  # before connect: it sees the handshake
        try:
            try:
                sock.connect(self.address)
            except zmq.ZMQError as exc:
                raise ValueError(
                    f"cannot connect to {self.address!r} ({exc}); expected an address like tcp://127.0.0.1:5555"
                ) from None
            try:
                reply = await asyncio.wait_for(self._handshake(sock), self._connect_timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"no reply from {self.address} within {self._connect_timeout}s; the ecoserve server may not be "
                    f"running there, or {self._auth_hint()}"
                ) from None
        except BaseException:
            watch.close()
            sock.close(linger=0)
            ctx.term()
            raise
        watch.connected()
        self.server_name = reply.server_name
        self.server_info = ServerInfo.from_message(reply)
        self._ctx, self._sock, self._watch = ctx, sock, watch
        self._receiver = asyncio.get_running_loop().create_task(self._receive(sock, watch))

    def _auth_hint(self) -> str:
        if self.auth_keys is None:
            return "it requires authentication (--auth curve: pass auth_keys=DIR, the keys from `ecoserve keys generate`)"
        return (
            "it refused this client's key (authentication: the server must run with --auth curve, its "
            "authorized_clients must hold this client's .pub, and server.pub must be that server's key)"
        )

    async def _handshake(self, sock: zmq.asyncio.Socket) -> protocol.HelloReply:
        await sock.send(protocol.encode(protocol.Hello(protocol.PROTOCOL_VERSION, self.client_name)))
        reply = protocol.decode(await sock.recv())
        if isinstance(reply, protocol.ErrorReply):
            raise RequestError(reply.code, reply.message)
        if not isinstance(reply, protocol.HelloReply):
            raise RequestError("bad_frame", f"expected HelloReply from {self.address}, got {type(reply).__name__}")
        if reply.protocol_version != protocol.PROTOCOL_VERSION:
            raise RequestError(
                "version", f"server speaks protocol {reply.protocol_version}, this client {protocol.PROTOCOL_VERSION}"
            )
        return reply

    async def _receive(self, sock: zmq.asyncio.Socket, watch: ServerWatch) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(watch.monitor, zmq.POLLIN)
        try:
            while True:
                self._receive_ready(sock, watch)  # what is here first: it may predate a close
                if self._error is not None:  # a connection-level error reply, or closed meanwhile
                    return
                if watch.lost():
                    self._receive_ready(sock, watch)  # replies sent before the close still count
                    self._shutdown(watch.error())
                    return
                await poller.poll()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a socket failure or an unreadable frame: no reply can be trusted now
            error = ConnectionError(f"the connection to {self.address} failed ({exc}); make a new client")
            self._shutdown(error)

    def _receive_ready(self, sock: zmq.asyncio.Socket, watch: ServerWatch) -> None:
        """Dispatch every message already received, without waiting."""
        while self._error is None:
            try:
                frame = sock.recv(zmq.NOBLOCK).result()  # type: ignore[attr-defined]
            except zmq.Again:
                return
            watch.heard()
            self._dispatch(protocol.decode(frame))

    def _dispatch(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.StatsReply):
            if self._stats:
                waiter = self._stats.popleft()
                if not waiter.done():
                    waiter.set_result(dict(message.values))
        elif isinstance(message, (protocol.TokenDelta, protocol.RequestFinished, protocol.ErrorReply)):
            request_id = message.request_id
            if request_id is None:
                # Not attributable to one call (the server could not read a frame, or is going
                # away): fail everything rather than leave a call waiting forever.
                assert isinstance(message, protocol.ErrorReply)
                self._shutdown(RequestError(message.code, message.message))
            elif (requests := self._requests.get(request_id)) is not None:
                requests.put_nowait(message)
            # else: a late reply to a request this client already stopped waiting for
        else:
            _log.warning("ignoring an unexpected %s from %s", type(message).__name__, self.address)

    def _shutdown(self, error: BaseException) -> None:
        """Fail every pending call with `error`, refuse new ones and close the socket."""
        if self._error is None:
            self._error = error
        for requests in self._requests.values():
            requests.put_nowait(error)
        self._requests.clear()
        while self._stats:
            waiter = self._stats.popleft()
            if not waiter.done():
                waiter.set_exception(copy.copy(error))
        if self._receiver is not None and self._receiver is not asyncio.current_task():
            self._receiver.cancel()
        if self._watch is not None:
            self._watch.close()
        if self._sock is not None and self._ctx is not None and not self._sock.closed:
            self._sock.close(linger=0)
            self._ctx.term()

    async def _send(self, message: protocol.Message) -> None:
        assert self._sock is not None
        await self._sock.send(protocol.encode(message))

    def _send_nowait(self, message: protocol.Message) -> None:
        """Best effort, callable from `finally` blocks: aborts must not wait or raise."""
        if self._sock is None or self._sock.closed:
            return
        try:
            sent = asyncio.ensure_future(self._sock.send(protocol.encode(message)))
        except zmq.ZMQError as exc:
            _log.warning("could not send %s to %s: %s", type(message).__name__, self.address, exc)
            return
        sent.add_done_callback(lambda f: f.cancelled() or f.exception())

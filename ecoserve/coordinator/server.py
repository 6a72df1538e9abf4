"""The coordinator: asyncio (uvloop) over two ZeroMQ ROUTER sockets.

`client_to_coordinator` (the front door) takes client frames; `worker_to_coordinator` takes
worker frames. Each message updates the request lifecycle (request.py) and the worker views;
whenever something changed, the scheduling task calls `policy.schedule(state)` and applies the
decisions by sending worker messages. The coordinator never touches tensors.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio

from ecoserve import protocol as p
from ecoserve.auth import load_server_keys, start_authenticator
from ecoserve.config import CoordinatorConfig
from ecoserve.coordinator.clients import ClientWatch
from ecoserve.coordinator.frontend import BadRequest, Limits, TextCodec, build_request
from ecoserve.coordinator.lifecycle import Lifecycle
from ecoserve.coordinator.limits import ClientLimits
from ecoserve.coordinator.outbox import Outbox, Sent
from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.policy import Policy
from ecoserve.coordinator.workers import ExpectedRank, WorkerRegistry, worker_identity

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0
RECV_BATCH = 32  # messages read before the policy runs again
REGISTER_MAX_BYTES = 64 * 1024  # the most read from a peer that is not (yet) a registered worker
FLUSH_INTERVAL_S = 0.005  # how often frames queued for slow peers are offered again


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        model_folder: Path,
        expected: list[ExpectedRank],
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.codec = TextCodec(model_folder)
        self.registry = WorkerRegistry(expected, config.secret, config.heartbeat_timeout_s)
        self.ctx = zmq.asyncio.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        # A full pipe to a client raises Again, a vanished client EHOSTUNREACH: nothing is dropped
        # silently (coordinator/outbox.py keeps what a slow client cannot take yet).
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Frames up to 4x the protocol's limit are read and answered with an error naming the
        # limit; ZeroMQ drops the connection of a peer that sends anything larger.
        self.front.setsockopt(zmq.MAXMSGSIZE, 4 * p.MAX_FRAME_BYTES)
        self.front_max_bytes = p.MAX_FRAME_BYTES  # lowered to what the longest prompt needs once workers register
        self.server_keys = load_server_keys(config.keys_dir) if config.keys_dir is not None else None  # auth "curve"
        self.authenticator: Any = None
        if self.server_keys is not None:  # CURVE: encrypted, and only authorized client keys get in
            self.front.curve_server = True
            self.front.curve_secretkey = self.server_keys.secret
            self.front.curve_publickey = self.server_keys.public
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        # As on the front: a worker that cannot take a frame yet gets it later, in order, and
        # one whose connection is gone is declared lost instead of silently missing it.
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.worker_outbox = Outbox(self.back, max_queued_bytes=2**62)  # deltas only are bounded: none here
        self._unreachable: set[int] = set()  # ranks found gone, declared lost right after the current update
        self.client_addr = ""
        self.control_addr = ""
        self.lifecycle = Lifecycle(
            policy or make_policy(config.policy, **config.policy_options), self.registry, self.codec, self._to_client, self._to_worker, config
        )
        self.clients: dict[bytes, int] = {}  # routing id -> client number, after Hello
        self.client_limits = ClientLimits(config.max_inflight_per_client, config.max_prompt_tokens_per_client)
        self.strays = 0  # control frames refused: not from a registered worker's own socket
        self._next_stray_log = 0.0
        self.client_watch = ClientWatch(self.front, self._client_gone)  # disconnected clients' requests end
        self.outbox = Outbox(self.front, config.max_queued_bytes_per_client)
        self._lost_deltas: dict[bytes, set[str]] = {}  # client -> requests a delta of which was refused
        self._ending_slow = False  # True while too-slow requests are aborted: their terminal says so
        self._stats_waiters: list[tuple[bytes, set[int], dict[str, float], float]] = []
        self._ready = asyncio.Event()
        self._stopping = False
        self.draining = False

    # --- sockets ---------------------------------------------------------------------------

    def bind(self) -> None:
        c = self.config
        if self.server_keys is not None:
            self.authenticator = start_authenticator(self.ctx, self.server_keys.authorized)
        elif c.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("the client socket on %s accepts anyone who can reach it; see --auth curve", c.host)
        try:
            self.control_addr = bind_socket(self.back, c.control_host, c.control_port, "workers' control socket")
            self.client_addr = bind_socket(self.front, c.host, c.port, "client socket (--host, --port)")
        except ValueError:
            self.close()  # nothing started: release what was opened, then refuse
            raise

    def _to_client(self, client: bytes, message: Any) -> None:
        if isinstance(message, p.RequestFinished) and (
            self._ending_slow or message.request_id in self._lost_deltas.get(client, ())
        ):  # the client missed some of its tokens: its one terminal event says why
            self._lost_deltas.get(client, set()).discard(message.request_id)
            self.lifecycle.counters["requests_client_too_slow"] += 1
            message = p.ErrorReply(message.request_id, "client_too_slow", self._too_slow_text())
        if isinstance(message, (p.RequestFinished, p.ErrorReply)) and message.request_id is not None:
            if not self.lifecycle.has_client_request(client, message.request_id):  # its terminal event
                self.client_limits.release(client, message.request_id)
        delta_of = message.request_id if isinstance(message, p.TokenDelta) else None
        if self.outbox.send(client, p.encode(message), delta_of) is Sent.OVER:
            assert delta_of is not None
            if client not in self._lost_deltas:  # end its requests soon, not inside the caller's update
                asyncio.get_running_loop().call_soon(self._end_too_slow, client)
            self._lost_deltas.setdefault(client, set()).add(delta_of)

    def _too_slow_text(self) -> str:
        return (
            f"the client did not read its replies: more than {self.config.max_queued_bytes_per_client} bytes of "
            "tokens waited for it, so its requests in flight were aborted; read streams as they arrive"
        )

    def _end_too_slow(self, client: bytes) -> None:
        """`client` let its queue pass the bound: abort all it has in flight (KV freed everywhere);
        its queued deltas go, and each request's one terminal event is a "client_too_slow" error."""
        if client not in self._lost_deltas:  # it vanished meanwhile
            return
        mine = [crid for c, crid in self.lifecycle.by_client if c == client]
        self.outbox.drop_deltas(client, set(mine))
        self._ending_slow = True
        try:
            for crid in mine:
                self.lifecycle.abort_client_request(client, crid)
        finally:
            self._ending_slow = False
        del self._lost_deltas[client]  # every request that lost a delta has had its terminal event
        self.lifecycle.counters["clients_too_slow"] += 1
        log.warning("a client stopped reading: %d of its requests ended with client_too_slow", len(mine))
        self.lifecycle.kick()

    def _to_worker(self, rank: int, message: Any) -> None:
        if self.worker_outbox.send(worker_identity(rank), p.encode(message)) is Sent.GONE:
            self._worker_unreachable(rank)

    def _worker_unreachable(self, rank: int) -> None:
        """A frame for `rank` found its control connection gone: what it was sent is lost, so the
        worker is lost (declared right after the current update, not inside it)."""
        if self._stopping or rank not in self.registry.views or self.is_lost(rank) or rank in self._unreachable:
            return
        self._unreachable.add(rank)
        asyncio.get_running_loop().call_soon(self._lose_unreachable, rank)

    def _lose_unreachable(self, rank: int) -> None:
        self._unreachable.discard(rank)
        if not self._stopping and not self.is_lost(rank):
            self.worker_lost(rank, "its control connection is gone: a message to it could not be delivered")

    # --- main tasks ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every expected worker has registered."""
        return self._ready.is_set()

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def serve(self) -> None:
        """Run until stop() is called."""
        tasks = [
            asyncio.create_task(self._front_loop()),
            asyncio.create_task(self._back_loop()),
            asyncio.create_task(self._schedule_loop()),
            asyncio.create_task(self._monitor_loop()),
            asyncio.create_task(self.client_watch.run()),
            asyncio.create_task(self._flush_loop(self.outbox, lambda client: None)),  # ClientWatch ends their requests
            asyncio.create_task(self._flush_loop(self.worker_outbox, self._gone_worker)),
        ]
        try:
            while not self._stopping:
                done = [t for t in tasks if t.done()]
                for t in done:
                    t.result()  # a crashed loop is a bug: surface it
                await asyncio.sleep(0.1)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, let in-flight ones finish for up to `timeout_s`, fail the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.lifecycle.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.lifecycle.fail_all("the server shut down before the request finished")

    def stop(self) -> None:
        self._stopping = True  # first: a worker already gone is not declared lost now
        for rank in self.registry.alive_ranks():
            self._to_worker(rank, p.Shutdown())
        self.worker_outbox.flush()  # one more offer: the flush task ends with serve()

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
        self.client_watch.close()
        self.front.close()
        self.back.close()
        self.ctx.term()

    def worker_lost(self, rank: int, reason: str) -> None:
        """The launcher saw the rank's process exit, or its heartbeats stopped."""
        self.lifecycle.worker_lost(rank, reason)
        for _, ranks, _, _ in self._stats_waiters:  # stats calls stop waiting for it
            ranks.discard(rank)
        self._expire_stats(time.monotonic())

    def is_lost(self, rank: int) -> bool:
        """Whether `rank` registered and was then declared lost (the launcher fences it)."""
        view = self.registry.views.get(rank)
        return view is not None and not view.alive

    async def _front_loop(self) -> None:
        while True:
            frames = await self._recv_batch(self.front, copy=False)
            t0 = time.monotonic()  # the batch's arrival: later frames in it are not favoured
            self.client_watch.drain()  # closes first: see coordinator/clients.py
            for message in frames:
                self.client_watch.saw(message[0].bytes, message[0])
                parts = [f.bytes for f in message]
                client = parts[0]
                if len(parts) != 2:
                    self._to_client(client, p.ErrorReply(None, "bad_frame", "send exactly one frame per message"))
                    continue
                try:
                    msg = p.decode(parts[1], max_bytes=self.front_max_bytes, allowed=p.CLIENT_TO_COORDINATOR)
                except p.RefusedValue as exc:  # well formed, a value refused: answer the request it names
                    code = "bad_request" if exc.request_id else "bad_frame"
                    self._to_client(client, p.ErrorReply(exc.request_id, code, str(exc)))
                    continue
                except p.ProtocolError as exc:
                    self._to_client(client, p.ErrorReply(None, "bad_frame", str(exc)))
                    continue
                self._on_client(client, msg, t0)
            self._schedule_now()

    @staticmethod
    async def _recv_batch(sock: zmq.asyncio.Socket, copy: bool = True) -> list[list[Any]]:
        """The next message, plus up to RECV_BATCH - 1 more already waiting. Scheduling after
        each batch, not after each message, keeps a burst from waiting for its own tail.
        Parts are bytes, or zmq.Frame with copy=False."""
        batch = [await sock.recv_multipart(copy=copy)]
        while len(batch) < RECV_BATCH:
            try:
                batch.append(sock.recv_multipart(zmq.NOBLOCK, copy=copy).result())  # type: ignore[attr-defined]
            except zmq.Again:
                break
        return batch

    @staticmethod
    async def _flush_loop(outbox: Outbox, on_gone: Callable[[bytes], None]) -> None:
        """While any peer has frames waiting, offer them again every FLUSH_INTERVAL_S."""
        while True:
            await outbox.pending.wait()
            await asyncio.sleep(FLUSH_INTERVAL_S)
            for peer in outbox.flush():  # a vanished peer's queue is dropped
                on_gone(peer)

    def _gone_worker(self, sender: bytes) -> None:
        rank = self.registry.rank_of(sender)
        if rank is not None:
            self._worker_unreachable(rank)

    def _client_gone(self, client: bytes) -> None:
        """The client's connection closed: abort everything it still had in flight."""
        self.outbox.forget(client)
        self._lost_deltas.pop(client, None)
        aborted = self.lifecycle.abort_client_requests(client)
        self.lifecycle.counters["clients_disconnected"] += 1
        if aborted:
            log.info("a client disconnected with %d requests in flight; aborted them", aborted)

    def _schedule_now(self) -> None:
        if self._ready.is_set() and self.lifecycle.dirty.is_set():
            self.lifecycle.dirty.clear()
            self.lifecycle.schedule()

    def _on_client(self, client: bytes, msg: Any, t0: float) -> None:
        if isinstance(msg, p.Hello):
            if msg.protocol_version != p.PROTOCOL_VERSION:
                text = f"protocol version {msg.protocol_version} is not supported; this server speaks {p.PROTOCOL_VERSION}"
                self._to_client(client, p.ErrorReply(None, "version", text))
                return
            self.clients.setdefault(client, len(self.clients))
            self._to_client(client, self._hello_reply())
            return
        if client not in self.clients:
            self._to_client(client, p.ErrorReply(None, "bad_request", "send Hello first (protocol handshake)"))
            return
        if isinstance(msg, p.AddRequest):
            self._add(client, msg, t0)
        elif isinstance(msg, p.AbortRequest):
            if not self.lifecycle.abort_client_request(client, msg.request_id):
                self._to_client(
                    client, p.ErrorReply(msg.request_id, "unknown_request", f"no request {msg.request_id!r} in flight")
                )
        elif isinstance(msg, p.GetStats):
            self._start_stats(client)

    def _add(self, client: bytes, msg: p.AddRequest, t0: float) -> None:
        if self.draining:
            self._to_client(client, p.ErrorReply(msg.request_id, "shutting_down", "the server is shutting down"))
            return
        lc = self.lifecycle
        if not lc.can_serve():
            self._to_client(client, p.ErrorReply(msg.request_id, "failed", lc.cannot_serve_reason()))
            return
        if lc.has_client_request(client, msg.request_id):
            text = f"request id {msg.request_id!r} is already in flight on this connection"
            self._to_client(client, p.ErrorReply(msg.request_id, "bad_request", text))
            return
        held = functools.partial(lc.has_client_request, client)
        over = self.client_limits.refuse(client, 0, held)  # the request count, before tokenising
        if over is not None:
            self._to_client(client, p.ErrorReply(msg.request_id, "over_limit", over))
            return
        try:
            req = build_request(msg, client, f"c{self.clients[client]}:{msg.request_id}", self._limits(), self.codec)
        except BadRequest as exc:
            self._to_client(client, p.ErrorReply(msg.request_id, "bad_request", str(exc)))
            return
        over = self.client_limits.refuse(client, req.num_prompt_tokens, held)
        if over is not None:
            self._to_client(client, p.ErrorReply(msg.request_id, "over_limit", over))
            return
        req.arrival = t0
        req.events[0] = type(req.events[0])(req.status, t0)
        try:
            lc.admit(req)
        except ValueError as exc:  # the policy could not predict its length (nothing was queued)
            self._to_client(client, p.ErrorReply(msg.request_id, "bad_request", str(exc)))
            return
        self.client_limits.add(client, msg.request_id, req.num_prompt_tokens)

    def _hello_reply(self) -> p.HelloReply:
        if not self.ready:  # the limits come from the workers: none known until all registered
            return p.HelloReply(
                protocol_version=p.PROTOCOL_VERSION, server_name="ecoserve", model_id="", vocab_size=0,
                max_model_len=0, max_prompt_tokens=0, max_request_tokens=0,
            )
        limits = self._limits()
        pool_tokens = limits.max_request_blocks * limits.block_size
        return p.HelloReply(
            protocol_version=p.PROTOCOL_VERSION, server_name="ecoserve",
            model_id=next(iter(self.registry.info.values())).model_id, vocab_size=limits.vocab_size,
            max_model_len=limits.max_model_len, max_prompt_tokens=limits.max_prompt_tokens,
            max_request_tokens=min(limits.max_model_len, pool_tokens),
        )

    def _limits(self) -> Limits:
        info = next(iter(self.registry.info.values()))
        max_len = min(i.max_model_len for i in self.registry.info.values())
        return Limits(
            vocab_size=info.vocab_size,
            max_model_len=max_len,
            max_prompt_tokens=min(self.config.max_prompt_tokens or max_len, max_len - 1),
            max_request_blocks=self.registry.min_request_pool(),
            block_size=info.block_size,
        )

    async def _back_loop(self) -> None:
        while True:
            for parts in await self._recv_batch(self.back):
                self._on_worker_frame(parts[0], parts[1:])
            self._schedule_now()

    def _on_worker_frame(self, sender: bytes, frames: list[bytes]) -> None:
        """Only a registered worker's own socket speaks for its rank. Anyone else may only send a
        RegisterWorker (which needs the cluster secret); all else is dropped, counted and logged."""
        rank = self.registry.rank_of(sender)
        try:
            if len(frames) != 1:
                raise p.ProtocolError(f"{len(frames)} frames in one message; a worker sends exactly one")
            if rank is None:  # small and one type only: a stranger cannot make us parse much
                msg = p.decode(frames[0], max_bytes=REGISTER_MAX_BYTES, allowed=(p.RegisterWorker,))
            else:
                msg = p.decode(frames[0], allowed=p.WORKER_TO_COORDINATOR)
        except p.ProtocolError as exc:
            self._stray(sender, f"a frame it may not send ({exc})")
            return
        if isinstance(msg, p.RegisterWorker):
            self._register(sender, msg)
        elif msg.rank != rank:
            self._stray(sender, f"a {type(msg).__name__} for rank {msg.rank}")
        elif isinstance(msg, p.WorkerStats):
            self._on_worker_stats(msg)
        else:
            self.lifecycle.on_worker_message(msg)

    def _register(self, sender: bytes, msg: p.RegisterWorker) -> None:
        reason = self.registry.register(msg, sender)
        # The answer goes to the socket that asked, never to the rank it claims to be.
        reply = p.encode(p.RegisterReply(reason is None, reason or ""))
        if reason is None:
            self.worker_outbox.send(sender, reply)
        else:  # a refused peer may be a stranger: never queue for it (it could make us hold unbounded memory)
            self.worker_outbox.offer(sender, reply)
        if reason is not None:  # an error: it may be one of ours, misconfigured
            self._stray(sender, f"a registration as rank {msg.rank}: {reason}", logging.ERROR)
        elif self.registry.complete:
            self._ready.set()
            limits = self._limits()  # the largest useful client frame: the longest prompt as text
            self.front_max_bytes = min(p.MAX_FRAME_BYTES, 256 * limits.max_prompt_tokens + 64 * 1024)
        self.lifecycle.kick()

    def _stray(self, sender: bytes, what: str, level: int = logging.WARNING) -> None:
        """Count a refused control frame; log at most one line a second, however fast they come."""
        self.strays += 1
        now = time.monotonic()
        if now >= self._next_stray_log:
            self._next_stray_log = now + 1.0
            log.log(level, "control channel: refused %s from %r (%d refused so far)", what, sender[:64], self.strays)

    async def _schedule_loop(self) -> None:
        while True:
            wake = self.lifecycle.next_retry_in()  # a retry waiting out its backoff
            if wake is None:
                await self.lifecycle.dirty.wait()
            else:
                try:
                    await asyncio.wait_for(self.lifecycle.dirty.wait(), wake)
                except asyncio.TimeoutError:
                    pass
            self.lifecycle.dirty.clear()
            if self._ready.is_set():
                self.lifecycle.schedule()
            await asyncio.sleep(0)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.config.heartbeat_timeout_s / 4))
            now = time.monotonic()
            for rank in self.registry.silent(now):
                self.worker_lost(rank, f"no heartbeat for {self.config.heartbeat_timeout_s:.1f} s")
            self._expire_stats(now)

    # --- stats -------------------------------------------------------------------------------

    def _start_stats(self, client: bytes) -> None:
        ranks = set(self.registry.alive_ranks())
        for rank in ranks:
            self._to_worker(rank, p.QueryStats())
        values = self.lifecycle.stats() | {
            "coordinator_pid": float(os.getpid()), "draining": float(self.draining),
            "control_frames_refused": float(self.strays),
            "client_queued_frames": float(self.outbox.queued_frames()),
            "client_queued_bytes": float(self.outbox.queued_bytes()),
        }
        self._stats_waiters.append((client, ranks, values, time.monotonic() + STATS_TIMEOUT_S))
        self._expire_stats(time.monotonic())

    def _on_worker_stats(self, msg: p.WorkerStats) -> None:
        for client, ranks, values, _ in self._stats_waiters:
            if msg.rank in ranks:
                ranks.discard(msg.rank)
                for key, value in msg.values.items():
                    values[f"rank{msg.rank}.{key}"] = value
                values["kv_used_blocks"] = values.get("kv_used_blocks", 0.0) + msg.values.get("used_blocks", 0.0)
                break
        self._expire_stats(time.monotonic())

    def _expire_stats(self, now: float) -> None:
        """Answer every stats call whose workers all replied (or whose time ran out), in order."""
        while self._stats_waiters:
            client, ranks, values, deadline = self._stats_waiters[0]
            if ranks and now < deadline:
                return
            self._stats_waiters.pop(0)
            values["stats_missing_workers"] = float(len(ranks))
            self._to_client(client, p.StatsReply(values))


def bind_socket(sock: zmq.asyncio.Socket, host: str, port: int, what: str) -> str:
    """Bind `sock` to `host`:`port` (0: a free port) and return its address, or raise a
    ValueError naming the address and why it cannot be bound (in use, or not this machine's)."""
    addr = f"tcp://{host}:{port or '*'}"
    try:
        if port:
            sock.bind(addr)
            return addr
        return f"tcp://{host}:{sock.bind_to_random_port(f'tcp://{host}')}"
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(
                f"cannot bind the {what} to {addr}: the address is in use (another server listens there); "
                "choose a free port, or 0 to pick one"
            ) from None
        raise ValueError(
            f"cannot bind the {what} to {addr}: {exc.strerror}; give an address of this machine "
            "(127.0.0.1: this machine only, 0.0.0.0: every interface)"
        ) from None

"""What every worker rank shares: joining the torch.distributed world, the local engine, the
KV-transfer worker half, the control channel to the coordinator, heartbeats and the loop.

A worker is single-threaded. Each turn of its loop reads every waiting control message, moves
KV transfers forward, runs one engine step if it has work, and sends a heartbeat when one is
due. The prefill and decode workers subclass it with what they do on each message and step.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import zmq

from ecoserve import protocol as p
from ecoserve.config import WorkerConfig
from ecoserve.engine.llm_engine import LLMEngine
from ecoserve.runtime.faults import Faults
from ecoserve.engine.sequence import Sequence
from ecoserve.envs import set_offline_hub
from ecoserve.kv_transfer.backend import TorchDistBackend
from ecoserve.kv_transfer.engine import KVTransferWorker
from ecoserve.kv_transfer.types import TransferState, TransferUpdate

log = logging.getLogger(__name__)

IDLE_POLL_MS = 20  # how long an idle worker blocks on its control socket per turn
TRANSFER_POLL_MS = 1  # the same while transfers are in flight


class WorkerRefused(RuntimeError):
    """The coordinator refused this worker's registration; the text says why."""


class ControlChannel:
    """The worker's end of `worker_to_coordinator`: a DEALER socket speaking protocol frames."""

    def __init__(self, addr: str, rank: int) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"rank-{rank}".encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(addr)

    def send(self, message: Any) -> None:
        self.sock.send(p.encode(message))

    def recv_all(self, timeout_ms: int) -> list[Any]:
        """Every message waiting now, after blocking up to `timeout_ms` for the first."""
        out = []
        if self.sock.poll(timeout_ms):
            while True:
                try:
                    frame = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                out.append(p.decode(frame, allowed=p.COORDINATOR_TO_WORKER))
        return out

    def close(self) -> None:
        self.sock.close()


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        set_offline_hub()
        self.config = config
        self.rank = config.rank
        self.engine = LLMEngine(config.engine)
        backend = "nccl" if self.engine.device == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=config.dist_init_method,
            rank=config.rank,
            world_size=config.world_size,
            timeout=timedelta(seconds=config.dist_timeout_s),
        )
        self.pool = self.engine.pool
        self.backend = TorchDistBackend()
        self.transfers = KVTransferWorker(
            self.backend, self.engine.runner.kv_cache, self.rank,
            max_in_flight_per_pair=config.max_transfers_in_flight_per_pair,
        )
        self.channel = ControlChannel(config.control_addr, self.rank)
        self.quarantine: dict[str, Sequence] = {}  # timed-out transfers whose ops may still run
        self.stopping = False
        self.faults = Faults.for_rank(self.rank)  # tests only (ECOSERVE_FAULT); inert unless set
        self._next_heartbeat = 0.0
        self._parent = os.getppid()

    # --- registration and loop -----------------------------------------------------------

    def register(self, timeout_s: float = 120.0) -> None:
        eng = self.engine
        self.channel.send(
            p.RegisterWorker(
                protocol_version=p.PROTOCOL_VERSION,
                secret=self.config.secret,
                rank=self.rank,
                role=self.config.role,
                pid=os.getpid(),
                num_blocks=self.pool.num_blocks,
                block_size=self.pool.block_size,
                max_num_batched_tokens=self.config.engine.scheduler.max_num_batched_tokens,
                model_id=eng.model_id,  # names the sim profile too: no sim worker pairs with a real one
                dtype=str(eng.dtype).removeprefix("torch."),
                num_layers=eng.spec.num_layers,
                num_kv_heads=eng.spec.num_kv_heads,
                head_dim=eng.spec.head_dim,
                vocab_size=eng.spec.vocab_size,
                max_model_len=eng.max_model_len,
            )
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in self.channel.recv_all(100):
                if isinstance(msg, p.RegisterReply):
                    if not msg.accepted:
                        raise WorkerRefused(f"rank {self.rank}: the coordinator refused registration: {msg.message}")
                    return
                if isinstance(msg, p.Shutdown):
                    raise WorkerRefused(f"rank {self.rank}: shut down before registration completed")
        raise TimeoutError(f"rank {self.rank}: no registration reply from {self.config.control_addr} in {timeout_s:.0f} s")

    def run(self) -> None:
        while not self.stopping:
            busy = self.has_work()
            timeout = 0 if busy else (TRANSFER_POLL_MS if self.transfers.num_in_flight else IDLE_POLL_MS)
            for msg in self.channel.recv_all(timeout):
                self.handle(msg)
            self.poll_transfers()
            if self.quarantine:
                self.drain_quarantine()
            if not self.stopping and self.has_work():
                self.step()
            self._heartbeat()

    def handle(self, msg: Any) -> None:
        if isinstance(msg, p.QueryStats):
            values = {
                "used_blocks": float(self.pool.num_used),
                "num_blocks": float(self.pool.num_blocks),
                "pid": float(os.getpid()),
                "transfers_in_flight": float(self.transfers.num_in_flight),
                "quarantined_requests": float(len(self.quarantine)),
            }
            values.update({k: float(v) for k, v in self.stats().items()})
            self.channel.send(p.WorkerStats(rank=self.rank, values=values))
        elif isinstance(msg, p.Shutdown):
            self.stopping = True
        elif isinstance(msg, p.AbortWork):
            self.abort(msg.request_id)
        elif isinstance(msg, p.PeerLost):
            self.peer_lost(msg.rank)
        else:
            self.handle_work(msg)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.config.heartbeat_interval_s
        if os.getppid() != self._parent:  # the launcher died: nobody will stop us
            log.error("rank %d: launcher exited; stopping", self.rank)
            self.stopping = True
        sched = self.engine.scheduler
        self.channel.send(
            p.Heartbeat(
                rank=self.rank, free_blocks=self.pool.num_free, num_running=len(sched.running), num_waiting=len(sched.waiting)
            )
        )

    def report_transfer(self, update: TransferUpdate) -> None:
        """Tell the coordinator how this side of a transfer ended."""
        state = {TransferState.DONE: "done", TransferState.TIMED_OUT: "timed_out"}.get(update.state, "failed")
        self.channel.send(
            p.TransferStatus(rank=self.rank, request_id=update.request_id, state=state, message=update.message)
        )

    def release(self, request_id: str) -> None:
        self.channel.send(p.Released(rank=self.rank, request_id=request_id))

    def free_transfer_blocks(self, request_id: str, seq: Sequence) -> None:
        """Free a finished transfer's blocks, or hold them until no backend op of it can touch
        them any more (a timed-out copy-free op may still read or write the paged blocks)."""
        if self.transfers.ops_outstanding(request_id):
            self.quarantine[request_id] = seq
            return
        self.transfers.forget(request_id)
        seq.block_table.release(self.pool)

    def peer_lost(self, rank: int) -> None:
        """Rank `rank` is gone: its side of every transfer with it will never come. The roles
        also drop what they queued for it."""
        self.transfers.abort_peer(rank, f"peer rank {rank} was lost")

    def drain_quarantine(self) -> None:
        for rid, seq in list(self.quarantine.items()):
            if not self.transfers.ops_outstanding(rid):
                del self.quarantine[rid]
                self.transfers.forget(rid)
                seq.block_table.release(self.pool)

    # --- what the roles fill in ----------------------------------------------------------

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        raise NotImplementedError

    def handle_work(self, msg: Any) -> None:
        raise NotImplementedError

    def poll_transfers(self) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        raise NotImplementedError


class WorkerStartFailed(RuntimeError):
    """This worker could not be built (its model did not load, its KV pool did not fit); the text
    says which rank and why, in one line."""


def serve_worker(worker_cls: type[Worker], config: WorkerConfig) -> None:
    """Build, register and run one worker; report a fatal error to the coordinator first."""
    try:
        worker = worker_cls(config)
    except Exception as exc:  # not yet registered: the launcher reports it, and stops the cluster
        what = str(exc).splitlines()[0] if str(exc) else "(no message)"
        raise WorkerStartFailed(
            f"worker rank {config.rank} ({config.role}) could not start: {type(exc).__name__}: {what}"
        ) from exc
    try:
        worker.register()
        worker.run()
    except WorkerRefused:
        raise
    except Exception as exc:
        try:
            worker.channel.send(p.WorkerFailed(rank=config.rank, request_id=None, message=f"{type(exc).__name__}: {exc}"))
        finally:
            raise
    finally:
        worker.channel.close()
        worker.backend.close()
        if dist.is_initialized():
            dist.destroy_process_group()

"""What every worker rank shares: joining the torch.distributed world, the local engine, the
KV-transfer worker half, the control channel to the coordinator, heartbeats and the loop.

A worker is single-threaded. Each turn of its loop reads every waiting control message, moves
KV transfers forward, runs one engine step if it has work, and sends a heartbeat when one is
due. The prefill and decode workers subclass it with what they do on each message and step.

A worker never spins: a step that scheduled nothing (every queued prompt waiting for blocks,
every request held at its reservation) stalls the engine until something it waits for may have
changed (a message, a transfer's end, blocks freed); meanwhile the loop blocks on its control
socket (1 ms while transfers are in flight), leaving the CPU and the GIL to the transfer lanes.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import zmq

from ecoserve import protocol as p
from ecoserve.config import WorkerConfig
from ecoserve.engine.llm_engine import LLMEngine, resolve_device
from ecoserve.runtime.faults import Faults
from ecoserve.engine.sequence import Sequence
from ecoserve.engine.sim import SimRunner
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


def local_deadline(deadline_at: float, clock_lag_s: float = 0.0) -> float:
    """A transfer's deadline (wall-clock seconds, the coordinator's choice) on this process's
    time.monotonic() clock, which the transfer engine keeps; `clock_lag_s`: how far this host's
    wall clock is behind (tests inject it)."""
    return time.monotonic() + (deadline_at - (time.time() - clock_lag_s))


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        set_offline_hub()
        self.config = config
        self.rank = config.rank
        if config.engine.model.engine == "model" and resolve_device(config.engine.model.device) == "cuda":
            # One GPU per rank: NCCL refuses two ranks of one world on one device, and "cuda" means
            # the current device (0 unless set). Ranks are numbered node by node, so a node with
            # no more ranks than GPUs gives each of its ranks its own.
            torch.cuda.set_device(config.rank % torch.cuda.device_count())
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
        if isinstance(self.engine.runner, SimRunner):  # its steps wait out a modelled time: move KV meanwhile
            self.engine.runner.while_waiting = self.transfers.pump
        self.channel = ControlChannel(config.control_addr, self.rank)
        self.quarantine: dict[str, Sequence] = {}  # timed-out transfers whose ops may still run
        self.stopping = False
        self.faults = Faults.for_rank(self.rank)  # tests only (ECOSERVE_FAULT); inert unless set
        self._next_heartbeat = 0.0
        self._parent = os.getppid()
        # Set when a step scheduled nothing: what the engine then had (free blocks, running,
        # waiting). Until a message comes or that changes, stepping again would only spin.
        self._stalled_on: tuple[int, int, int] | None = None
        self.num_turns = 0  # loop turns (tests count them: an idle or stalled worker blocks)
        self.num_empty_steps = 0  # steps that scheduled nothing (each one stalls the engine)

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
            self.turn()

    def turn(self) -> None:
        """One turn of the loop: messages, transfers, at most one step, a heartbeat if due."""
        self.num_turns += 1
        busy = self.runnable()
        timeout = 0 if busy else (TRANSFER_POLL_MS if self.transfers.num_in_flight else IDLE_POLL_MS)
        for msg in self.channel.recv_all(timeout):
            self._stalled_on = None
            self.handle(msg)
        self.poll_transfers()
        if self.quarantine:
            self.drain_quarantine()
        if not self.stopping and self.runnable():
            before = self._engine_state()  # what the step's schedule saw (its own epilogue may change it)
            self.step()
            if self.engine.last_num_scheduled_tokens == 0 and not self.engine.last_preempted:
                self.num_empty_steps += 1
                self._stalled_on = before
        self._heartbeat()

    def runnable(self) -> bool:
        """Whether a step now could compute anything: work queued, and not stalled on a state
        that has not changed since a step found nothing to schedule."""
        if self._stalled_on is not None and self._stalled_on != self._engine_state():
            self._stalled_on = None
        return self._stalled_on is None and self.has_work()

    def _engine_state(self) -> tuple[int, int, int]:
        sched = self.engine.scheduler
        return self.pool.num_free, len(sched.running), len(sched.waiting)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, p.QueryStats):
            values = {
                "used_blocks": float(self.pool.num_used),
                "num_blocks": float(self.pool.num_blocks),
                "pid": float(os.getpid()),
                "transfers_in_flight": float(self.transfers.num_in_flight),
                "quarantined_requests": float(len(self.quarantine)),
                "loop_turns": float(self.num_turns),
                "empty_steps": float(self.num_empty_steps),
                **self.transfers.moved,  # KV bytes and seconds of transfers done, each direction
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
            p.TransferStatus(
                rank=self.rank, request_id=update.request_id, state=state, message=update.message,
                free_blocks=self.pool.num_free,
            )
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

"""Test fixture: a step-synchronous fake cluster, the real coordinator lifecycle and policy, fake workers.

Each tick the coordinator schedules, every worker handles its messages and takes one step,
and what the workers said is delivered back. Workers speak the real protocol messages
(`RunPrefill`, `ReceiveKV`, `Preempt`, `TokenEvents`, ...), keep real block accounting in a
`BlockPool`, and generate each request's *true* length of tokens; no model runs. Time is the
tick count, so runs are deterministic.

Used by the property-based policy tests (capacity never exceeded, reservations cover use,
one terminal event per request, no leaks when idle) and the fault tests of the lifecycle
(`kill` a worker: its peers drop their transfers with it on `PeerLost`; `fail_transfer`). It
lives in tests/, not beside the simulator: the simulator's `SimWorker` is the one simulated
worker in the package, and it has no tick clock, no kills and no reservation-overrun check.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ecoserve import protocol as p
from ecoserve.config import ClusterShape, CoordinatorConfig
from ecoserve.coordinator.lifecycle import Lifecycle
from ecoserve.coordinator.policy import Policy, WorkerView
from ecoserve.coordinator.request import Request
from ecoserve.coordinator.workers import ExpectedRank, WorkerRegistry
from ecoserve.kv_cache import BlockPool
from ecoserve.sim.lifecycle import NullCodec, lifecycle_leaks
from ecoserve.params import SLO, SamplingParams


@dataclass
class _Seq:
    rid: str
    prompt: int
    true_len: int
    max_tokens: int
    produced: int = 1  # the first token comes from prefill
    blocks: list[int] = field(default_factory=list)
    cap: int | None = None  # reservation in KV tokens
    host_blocks: int = 0
    mode: str | None = None  # while parked: "swap" | "recompute"

    @property
    def kv_tokens(self) -> int:
        return self.prompt + self.produced - 1

    @property
    def target(self) -> int:
        return min(self.true_len, self.max_tokens)


class FakeWorker:
    """One rank. `role` decides what it takes: prefill, decode, or both (mixed)."""

    def __init__(
        self, cluster: FakeCluster, rank: int, role: str, num_blocks: int, block_size: int, token_budget: int,
        host_blocks: int = 0,
    ) -> None:
        self.cluster, self.rank, self.role = cluster, rank, role
        self.pool = BlockPool(num_blocks, block_size)
        self.token_budget = token_budget
        self.host_free = self.host_total = host_blocks
        self.inbox: deque[Any] = deque()
        self.prefill_queue: deque[tuple[p.RunPrefill, int]] = deque()  # (msg, tokens left)
        self.held: dict[str, list[int]] = {}  # prefill side: KV waiting to be sent
        self.sending: dict[str, tuple[int, int]] = {}  # rid -> (dst rank, ticks left)
        self.to_receive: deque[p.ReceiveKV] = deque()
        self.receiving: dict[str, _Seq] = {}
        self.running: dict[str, _Seq] = {}  # arrival order
        self.local_waiting: deque[_Seq] = deque()  # dropped by the worker itself: recompute when room
        self.parked: dict[str, _Seq] = {}  # preempted by order
        self.to_resume: deque[_Seq] = deque()
        self.alive = True
        self.max_used = 0
        self.violations: list[str] = []

    # --- helpers ---------------------------------------------------------------------------------

    def _alloc(self, n: int) -> list[int] | None:
        if n > self.pool.num_free:
            return None
        blocks = self.pool.allocate(n) if n else []
        self.max_used = max(self.max_used, self.pool.num_used)
        return blocks

    def _grow(self, seq: _Seq, tokens: int) -> bool:
        need = self.pool.blocks_for_tokens(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        got = self._alloc(need)
        if got is None:
            return False
        seq.blocks.extend(got)
        return True

    def _free(self, seq: _Seq) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []

    def send(self, msg: Any) -> None:
        self.cluster.outbox.append(msg)

    # --- messages --------------------------------------------------------------------------------

    def handle(self, msg: Any) -> None:
        if isinstance(msg, p.RunPrefill):
            self.prefill_queue.append((msg, len(msg.prompt_token_ids) + len(msg.generated_token_ids)))
        elif isinstance(msg, p.SendKV):
            self.sending[msg.request_id] = (msg.dst_rank, self.cluster.transfer_ticks)
        elif isinstance(msg, p.ReceiveKV):
            self.to_receive.append(msg)
        elif isinstance(msg, p.ExtendReservation):
            seq = self.running.get(msg.request_id) or self.receiving.get(msg.request_id)
            if seq is not None:
                seq.cap = msg.reserve_tokens
        elif isinstance(msg, p.Preempt):
            self._preempt(msg)
        elif isinstance(msg, p.Resume):
            seq = self.parked.pop(msg.request_id, None)
            if seq is not None:
                seq.cap = msg.reserve_tokens
                self.to_resume.append(seq)
        elif isinstance(msg, p.AbortWork):
            self._abort(msg.request_id)
        elif isinstance(msg, p.PeerLost):
            self._peer_lost(msg.rank)

    def _peer_lost(self, rank: int) -> None:
        """Transfers with the lost rank fail: blocks freed, reported (Released if aborted meanwhile)."""
        for rid, (dst, _) in list(self.sending.items()):
            if dst == rank:
                del self.sending[rid]
                self.pool.free(self.held.pop(rid))
                self.send(p.TransferStatus(self.rank, rid, "failed", f"peer rank {rank} was lost"))
        self.to_receive = deque(m for m in self.to_receive if m.src_rank != rank)
        for rid in [r for r in self.receiving if self.cluster.sources.get(r) == rank]:
            self._free(self.receiving.pop(rid))
            self.send(p.TransferStatus(self.rank, rid, "failed", f"peer rank {rank} was lost"))

    def _preempt(self, msg: p.Preempt) -> None:
        seq = self.running.pop(msg.request_id, None)
        if seq is None:
            return  # finished before the order arrived
        mode = msg.mode
        n = len(seq.blocks)
        if mode == "swap" and n > self.host_free:
            mode = "recompute"
        if mode == "swap":
            self.host_free -= n
            seq.host_blocks = n
        self._free(seq)
        seq.mode = mode
        self.parked[seq.rid] = seq
        self.send(p.Preempted(self.rank, seq.rid, mode, self.pool.num_free))

    def _abort(self, rid: str) -> None:
        for msg, _ in list(self.prefill_queue):
            if msg.request_id == rid:
                self.prefill_queue = deque(x for x in self.prefill_queue if x[0].request_id != rid)
        if rid in self.held:
            self.pool.free(self.held.pop(rid))
        self.sending.pop(rid, None)
        self.to_receive = deque(m for m in self.to_receive if m.request_id != rid)
        for table in (self.receiving, self.running, self.parked):
            seq = table.pop(rid, None)
            if seq is not None:
                self._drop(seq)
        for q in (self.local_waiting, self.to_resume):
            for seq in [s for s in q if s.rid == rid]:
                q.remove(seq)
                self._drop(seq)
        self.send(p.Released(self.rank, rid))

    def _drop(self, seq: _Seq) -> None:
        self._free(seq)
        self.host_free += seq.host_blocks
        seq.host_blocks = 0

    # --- one step --------------------------------------------------------------------------------

    def step(self) -> None:
        while self.inbox:
            self.handle(self.inbox.popleft())
        if self.role in ("prefill", "mixed"):
            self._prefill_step()
        if self.role == "prefill":
            self._send_step()
        if self.role in ("decode", "mixed"):
            self._receive_step()
            self._decode_step()

    def _prefill_step(self) -> None:
        budget = self.token_budget
        while self.prefill_queue and budget > 0:
            msg, left = self.prefill_queue[0]
            n = min(left, budget)
            budget -= n
            if n < left:
                self.prefill_queue[0] = (msg, left - n)
                return
            kv = len(msg.prompt_token_ids) + len(msg.generated_token_ids)
            blocks = self._alloc(self.pool.blocks_for_tokens(kv + (1 if msg.decode_locally else 0)))
            if blocks is None:
                self.prefill_queue[0] = (msg, 0)
                return  # no room for the prompt's KV yet
            self.prefill_queue.popleft()
            true_len = self.cluster.true_length(msg.request_id)
            produced = len(msg.generated_token_ids) + 1  # a retry replays what it had produced
            done = min(true_len, msg.params.max_tokens) <= produced
            reason = ("length" if produced >= msg.params.max_tokens else "stop") if done else None
            self.send(p.PrefillDone(self.rank, msg.request_id, 1, reason))
            if done:
                self.pool.free(blocks)
            elif msg.decode_locally:
                seq = _Seq(msg.request_id, len(msg.prompt_token_ids), true_len, msg.params.max_tokens, produced, blocks=blocks)
                self.running[seq.rid] = seq
            else:
                self.held[msg.request_id] = blocks

    def _send_step(self) -> None:
        for rid, (dst, left) in list(self.sending.items()):
            peer = self.cluster.workers[dst]
            if rid not in peer.receiving:
                continue  # the receiver has not posted yet
            if left > 1:
                self.sending[rid] = (dst, left - 1)
                continue
            del self.sending[rid]
            self.pool.free(self.held.pop(rid))
            self.send(p.TransferStatus(self.rank, rid, "done", ""))
            peer.kv_arrived(rid)

    def kv_arrived(self, rid: str) -> None:
        seq = self.receiving.pop(rid)
        self.running[rid] = seq
        self.send(p.TransferStatus(self.rank, rid, "done", ""))

    def _receive_step(self) -> None:
        while self.to_receive:
            msg = self.to_receive[0]
            produced = len(msg.generated_token_ids) + 1
            blocks = self._alloc(self.pool.blocks_for_tokens(len(msg.prompt_token_ids) + produced - 1))
            if blocks is None:
                return
            self.to_receive.popleft()
            self.cluster.sources[msg.request_id] = msg.src_rank
            seq = _Seq(msg.request_id, len(msg.prompt_token_ids), self.cluster.true_length(msg.request_id),
                       msg.params.max_tokens, produced, blocks=blocks, cap=msg.reserve_tokens)
            self.receiving[seq.rid] = seq

    def _decode_step(self) -> None:
        for q in (self.to_resume, self.local_waiting):  # back in when their KV fits again
            while q and self._grow(q[0], q[0].kv_tokens):
                back = q.popleft()
                self.host_free += back.host_blocks
                back.host_blocks, back.mode = 0, None
                self.running[back.rid] = back
        ids, tokens, reasons, preempted = [], [], [], []
        for rid in list(self.running):
            seq = self.running.get(rid)
            if seq is None:
                continue  # preempted earlier in this step
            target = seq.kv_tokens + 1  # this step writes the last token's KV
            if seq.cap is not None and self.pool.blocks_for_tokens(target) > self.pool.blocks_for_tokens(seq.cap):
                continue  # held at its reservation until the coordinator extends it
            while not self._grow(seq, target):
                victim = next(reversed(self.running))  # newest
                vseq = self.running.pop(victim)
                self._free(vseq)
                self.local_waiting.appendleft(vseq)
                preempted.append(victim)
                if victim == rid:
                    break
            if rid not in self.running:
                continue
            if seq.cap is not None and len(seq.blocks) > self.pool.blocks_for_tokens(seq.cap):
                self.violations.append(f"{rid} holds {len(seq.blocks)} blocks over its reservation of {seq.cap} tokens")
            seq.produced += 1
            done = seq.produced >= seq.target
            ids.append(rid)
            tokens.append(1)
            reasons.append(("length" if seq.produced >= seq.max_tokens else "stop") if done else None)
            if done:
                del self.running[rid]
                self._free(seq)
        if ids or preempted:
            self.send(p.TokenEvents(rank=self.rank, request_ids=ids, token_ids=tokens, finish_reasons=reasons,
                                    preempted=preempted, free_blocks=self.pool.num_free))

    def idle(self) -> bool:
        return not (
            self.prefill_queue or self.held or self.sending or self.to_receive or self.receiving or self.running
            or self.local_waiting or self.parked or self.to_resume
        )

    def leaks(self) -> list[str]:
        out = []
        if self.pool.num_free != self.pool.num_blocks:
            out.append(f"rank {self.rank}: {self.pool.num_used} device blocks still held")
        if self.host_free != self.host_total:
            out.append(f"rank {self.rank}: {self.host_total - self.host_free} host blocks still held")
        return out


@dataclass(frozen=True)
class WorkerSpec:
    role: str
    num_blocks: int = 256
    block_size: int = 16
    token_budget: int = 512
    host_blocks: int = 0


def worker_specs(shape: ClusterShape, num_blocks: int = 256, decode_host_blocks: int = 0) -> list[WorkerSpec]:
    """One spec per rank of `shape`, in its rank order; host swap space on the decode ranks only.
    The fake workers have no tensor parallelism: the shape's TP degrees are not used."""
    return [WorkerSpec(role, num_blocks, host_blocks=decode_host_blocks if role == "decode" else 0)
            for role in shape.roles()]


class FakeCluster:
    def __init__(self, policy: Policy, workers: list[WorkerSpec], transfer_ticks: int = 1) -> None:
        self.transfer_ticks = transfer_ticks
        self.outbox: list[Any] = []
        self.client_messages: list[Any] = []
        self.true_lengths: dict[str, int] = {}
        self.sources: dict[str, int] = {}  # request id -> the prefill rank its KV comes from
        self.tick = 0
        expected = [ExpectedRank(rank, spec.role) for rank, spec in enumerate(workers)]
        self.registry = WorkerRegistry(expected, "", heartbeat_timeout_s=1e9)
        self.workers: dict[int, FakeWorker] = {}
        for rank, spec in enumerate(workers):
            self.workers[rank] = FakeWorker(self, rank, spec.role, spec.num_blocks, spec.block_size, spec.token_budget, spec.host_blocks)
            self.registry.views[rank] = WorkerView(
                rank, spec.role, spec.num_blocks, spec.block_size, spec.token_budget, spec.num_blocks,
            )
            self.registry.last_seen[rank] = float("inf")
        self.lifecycle = Lifecycle(
            policy, self.registry, NullCodec(), self._to_client, self._to_worker, CoordinatorConfig(),  # type: ignore[arg-type]
        )
        if policy.predictor is not None and policy.predictor.oracle:
            policy.predictor.bind(self.true_lengths.get)  # what the simulator's trace would tell it
        self._ids = 0

    def _to_client(self, client: bytes, msg: Any) -> None:
        self.client_messages.append(msg)

    def _to_worker(self, rank: int, msg: Any) -> None:
        if self.workers[rank].alive:
            self.workers[rank].inbox.append(msg)

    def true_length(self, rid: str) -> int:
        """The true length of the request behind `rid` (a retry's id is `retry<k>:<id>`)."""
        while rid.startswith("retry") and ":" in rid:
            rid = rid.split(":", 1)[1]
        return self.true_lengths[rid]

    def kill(self, rank: int, reason: str = "killed by the test") -> None:
        """The worker dies with everything it held; the coordinator learns it at once."""
        self.workers[rank].alive = False
        self.lifecycle.worker_lost(rank, reason)

    def fail_transfer(self, rid: str, state: str = "timed_out") -> None:
        """The decode side of `rid`'s transfer reports it failed (the workers' copies stay
        until the coordinator's AbortWork)."""
        req = self.lifecycle.requests[rid]
        assert req.decode_rank is not None
        self.lifecycle.on_worker_message(p.TransferStatus(req.decode_rank, rid, state, "injected by the test"))

    def submit(
        self, prompt_len: int, true_len: int, max_tokens: int, slo_ttft_ms: float | None = None,
        slo_tpot_ms: float | None = None,
    ) -> str:
        rid = f"r{self._ids}"
        self._ids += 1
        req = Request(
            request_id=rid, client=b"c", client_request_id=rid, prompt_token_ids=[1] * prompt_len,
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0), stream=False, slo=SLO(slo_ttft_ms, slo_tpot_ms),
        )
        self.true_lengths[rid] = true_len
        self.lifecycle.admit(req)
        return rid

    def step(self) -> None:
        self.lifecycle.schedule()
        for w in self.workers.values():
            if w.alive:
                w.step()
        out, self.outbox = self.outbox, []
        for msg in out:
            self.lifecycle.on_worker_message(msg)
        self.tick += 1

    def idle(self) -> bool:
        lc = self.lifecycle
        return not lc.requests and not lc.releasing and all(w.idle() for w in self.workers.values() if w.alive)

    def run_until_idle(self, max_ticks: int = 100_000) -> None:
        start = self.tick
        while not self.idle():
            if self.tick - start > max_ticks:
                raise AssertionError(f"not idle after {max_ticks} ticks: {len(self.lifecycle.requests)} requests live")
            self.step()

    def assert_no_leaks(self) -> None:
        problems = [f for w in self.workers.values() if w.alive for f in w.leaks()]
        problems += lifecycle_leaks(self.lifecycle)
        for v in self.registry.views.values():
            if v.committed_blocks or v.reserved_blocks or v.queued_prefill_tokens:
                problems.append(f"rank {v.rank}: committed {v.committed_blocks}, reserved {v.reserved_blocks}, "
                                f"queued {v.queued_prefill_tokens}")
        if problems:
            raise AssertionError("; ".join(problems))

    def terminal_events(self) -> dict[str, int]:
        """Per client request id: how many terminal messages the client got."""
        counts: dict[str, int] = {}
        for msg in self.client_messages:
            if isinstance(msg, (p.RequestFinished, p.ErrorReply)) and msg.request_id is not None:
                counts[msg.request_id] = counts.get(msg.request_id, 0) + 1
        return counts

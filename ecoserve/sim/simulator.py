"""Discrete-event simulator: the real coordinator (`Lifecycle` + policy) against simulated workers.

The coordinator side is the live system's own code: `Lifecycle` with the chosen policy, on a
simulated clock, receiving the real protocol messages (`RunPrefill`, `ReceiveKV`, `Preempt`,
`PrefillDone`, `TransferStatus`, ...). Only the workers are simulated, and time advances by the
latency model (`sim.latency.LatencyProfile`, DistServe's form):

- a prefill step takes `a + b·Σl + c·Σl²` ms for the prompts it batches (whole prompts up to
  the worker's token budget; a longer prompt runs alone);
- a decode step takes `a + b·Σctx + c·batch` ms for its running requests;
- a mixed (colocated) step does both, chunked prefill filling the budget left by decoding, and
  takes the sum of the two;
- a KV transfer takes `bytes / (link bandwidth · TP) + latency` (each GPU of a tensor-parallel
  group moves its own shard), transfers from one prefill instance one after another;
- swapping a preempted request out and back costs `bytes / swap bandwidth` each way, added to
  the worker's next step; recomputing costs a prefill of everything it had.

Speed: a decode worker advances its whole batch one step per event and touches a request only
when something happens to it (its end, the point where it nears or reaches its reservation);
KV blocks are granted per step to every request crossing a block boundary at once (requests
are counted by the step residue at which they cross), so the cost is per step and per request,
not per token or per block. The coordinator sees the same state a live one would: each decode
step's count and free blocks on the worker views, and a request's output length (`TokenCount`, a live count standing in for the token list the
simulator does not need). Per-token `TokenEvents` are replaced by one `DecodeProgress` per step
that lists only the requests something happened to; `SimLifecycle` folds it in exactly as
`Lifecycle._on_tokens` folds a step's tokens. Deterministic: ties break by event order.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ecoserve import protocol as p
from ecoserve.config import CoordinatorConfig
from ecoserve.coordinator.lifecycle import Lifecycle
from ecoserve.coordinator.policy import Policy, WorkerView
from ecoserve.coordinator.request import Request, RequestStatus as S
from ecoserve.coordinator.workers import ExpectedRank, WorkerRegistry
from ecoserve.data.workload import WorkloadRequest
from ecoserve.sim.fake_cluster import NullCodec, lifecycle_leaks
from ecoserve.latency.profile import LatencyProfile
from ecoserve.params import SLO, SamplingParams


class TokenCount:
    """A request's output "token list" in the simulator: only its length exists.

    `len()` is live: while the request sits on a decode worker it is that worker's count for it,
    so the policies' `len(req.output_token_ids)` reads what a live coordinator would have
    received by now. `append` (the first token, from `PrefillDone`) counts one more.
    """

    __slots__ = ("base", "seq")

    def __init__(self) -> None:
        self.base = 0
        self.seq: _Seq | None = None

    def __len__(self) -> int:
        seq = self.seq
        return self.base if seq is None else seq.now()

    def append(self, token: int) -> None:
        self.base += 1

    def __getitem__(self, index: Any) -> Any:
        n = len(self)
        return [0] * len(range(n)[index]) if isinstance(index, slice) else 0  # token ids are not simulated

    def __iter__(self) -> Any:
        return iter([0] * len(self))


@dataclass(frozen=True)
class DecodeProgress:
    """One decode step's news for the coordinator (the simulator's stand-in for TokenEvents)."""

    rank: int
    finished: list[tuple[str, str]]  # (request id, finish reason)
    resumed: list[str]  # produced their first token since coming back (preemption, recompute)
    preempted: list[str]  # dropped by the worker for room (recompute later)
    near_limit: list[str]  # reached `extend_ahead` tokens before their reservation


class SimLifecycle(Lifecycle):
    """`Lifecycle`, with a decode step's news folded in from `DecodeProgress`."""

    def on_worker_message(self, msg: Any) -> None:
        if not isinstance(msg, DecodeProgress):
            super().on_worker_message(msg)
            return
        view = self.registry.views[msg.rank]
        now = self.clock()
        for rid in msg.preempted:
            req = self.requests.get(rid)
            if req is not None and req.status is S.DECODING:
                req.transition(S.PREEMPTED, now)
                req.num_preemptions += 1
                self.counters["preemptions"] += 1
                self.counters["preemptions_local"] += 1
        for rid in msg.resumed:
            req = self.requests.get(rid)
            if req is None or req.status is not S.PREEMPTED:
                continue
            if req.preempt_mode is None or req.resuming:
                req.transition(S.DECODING, now)
                if req.resuming:
                    req.resuming, req.preempt_mode = False, None
                    req.decode_start_step = view.decode_steps - 1
                    self.ledger.started(rid, view.decode_steps - 1)
        ahead = self.policy.extend_ahead
        for rid in msg.near_limit:
            req = self.requests.get(rid)
            if (
                req is not None and ahead and req.status is S.DECODING and req.predicted_tokens is not None
                and len(req.output_token_ids) + ahead >= req.predicted_tokens and req.predicted_tokens < req.max_tokens
            ):
                self.near_limit[rid] = req
        for rid, reason in msg.finished:
            req = self.requests.get(rid)
            if req is not None and req.status in (S.DECODING, S.PREEMPTED):
                if req.status is S.PREEMPTED:
                    req.transition(S.DECODING, now)
                self.finish(req, reason)


# --- simulated workers ----------------------------------------------------------------------------


class _Seq:
    """A request on a decode (or mixed) worker."""

    __slots__ = (
        "rid", "prompt", "target", "max_tokens", "produced", "joined", "blocks", "cap", "version", "active",
        "host_blocks", "mode", "worker", "count", "near_for", "req", "rejoined", "cls", "granted",
    )

    def __init__(self, worker: SimWorker, rid: str, prompt: int, target: int, max_tokens: int, produced: int,
                 blocks: int, cap: int | None, req: Request) -> None:
        self.worker, self.rid, self.prompt, self.target, self.max_tokens = worker, rid, prompt, target, max_tokens
        self.produced, self.joined, self.blocks, self.cap, self.req = produced, 0, blocks, cap, req
        self.version, self.active, self.host_blocks = 0, False, 0
        self.mode: str | None = None
        self.near_for = -1  # the prediction it was last reported near
        self.rejoined = False
        self.cls = 0  # while active: its block class (SimWorker.classes)
        self.granted = -1  # the step at which it got its block in an exhausted step
        self.count: TokenCount = req.output_token_ids  # type: ignore[assignment]
        self.count.seq = self

    def now(self) -> int:
        return self.produced + (self.worker.steps - self.joined) if self.active else self.produced

    def sync(self) -> None:
        if self.active:
            self.produced += self.worker.steps - self.joined
            self.joined = self.worker.steps

    def detach(self) -> None:
        self.sync()
        self.count.base, self.count.seq = self.produced, None


@dataclass(frozen=True)
class HardwareConfig:
    """What the latency profile does not say: links, host memory, block and batch sizes."""

    block_size: int = 16
    prefill_token_budget: int = 2048  # prompt tokens per prefill step
    mixed_token_budget: int = 512  # tokens per colocated step (decode tokens + prefill chunks)
    link_bytes_per_s: float = 25e9  # per GPU, prefill -> decode (PCIe 4 x16 class)
    link_latency_s: float = 1e-4
    swap_bytes_per_s: float = 25e9  # device <-> host, per GPU
    host_blocks_factor: float = 1.0  # host swap space per worker, in units of its device pool
    kv_bytes_per_token: int = 0  # per instance (all GPUs); 0: from the profile's model
    # A live worker is one thread: it reads the coordinator's messages (work, SendKV, ReceiveKV,
    # preemptions) only between steps. True models that (each message waits for the end of the
    # step running when it came, so a KV transfer starts once both ends are between steps);
    # False hands every message to its worker at once.
    messages_between_steps: bool = False
    # Prefill workers fill their token budget with a chunk of the next prompt, as our engine's
    # FCFS batcher does (True), or run whole prompts, as DistServe's engine does (False). Mixed
    # workers always chunk.
    chunked_prefill: bool = False


@dataclass(frozen=True)
class InstanceSpec:
    """One worker instance: a role on `tp` GPUs with that TP degree's latency profile."""

    role: str  # "prefill" | "decode" | "mixed"
    profile: LatencyProfile
    tp: int = 1
    num_blocks: int | None = None  # default: the profile's KV capacity


class SimWorker:
    def __init__(self, sim: Simulator, rank: int, spec: InstanceSpec, hw: HardwareConfig, num_blocks: int,
                 kv_bytes_per_token: int) -> None:
        self.sim, self.rank, self.role, self.tp = sim, rank, spec.role, spec.tp
        self.profile = spec.profile
        self.block_size = hw.block_size
        self.budget = hw.mixed_token_budget if spec.role == "mixed" else hw.prefill_token_budget
        self.num_blocks = self.free = num_blocks
        self.host_total = self.host_free = int(hw.host_blocks_factor * num_blocks)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.link_s_per_token = kv_bytes_per_token / (hw.link_bytes_per_s * spec.tp)
        self.swap_s_per_token = kv_bytes_per_token / (hw.swap_bytes_per_s * spec.tp)
        self.link_latency_s = hw.link_latency_s
        self.busy = False
        self.defer = hw.messages_between_steps
        self.chunked = hw.chunked_prefill or spec.role == "mixed"
        self.inbox: list[Any] = []  # messages that came during the running step (defer)
        self.steps = 0
        self.extra_s = 0.0  # swap / recompute time added to the next step
        # prefill side
        self.prefill_queue: deque[list[Any]] = deque()  # [RunPrefill, tokens left, blocks taken]
        self.held: dict[str, int] = {}  # rid -> blocks, KV waiting to be sent
        self.link_free_at = 0.0
        self.send_orders: dict[str, p.SendKV] = {}
        # decode side
        self.to_receive: deque[p.ReceiveKV] = deque()
        self.receiving: dict[str, _Seq] = {}
        self.arrived: list[_Seq] = []
        self.running: dict[str, _Seq] = {}  # active, in the order they joined
        self.capped: dict[str, _Seq] = {}  # held at their reservation until extended
        self.local_waiting: deque[_Seq] = deque()
        self.parked: dict[str, _Seq] = {}
        self.to_resume: deque[_Seq] = deque()
        self.heap: list[tuple[int, int, str, int]] = []  # (step, tie, rid, version)
        self.rejoined: list[_Seq] = []  # came back into the batch at this step's start
        self.sum_ctx = 0
        # Block accounting without a per-request event per block: an active request holds
        # blocks_for(prompt + produced) (room for the token the next step writes), so it needs a
        # new block after each step s with (prompt + produced - 1) % block_size == 0, i.e. with
        # (cls + s) % block_size == 0 for its class cls, fixed while it runs. `classes` counts the
        # active requests per class: a step takes that many blocks at once. Between a step's end
        # and that grant (`ungranted`), what the step's requests hold is one token less.
        self.classes = [0] * self.block_size
        self.ungranted = 0
        # Padded profiles (decode cost by the longest context): each active request's context
        # is `steps + offset`, offset = prompt + produced - joined, constant while it runs; the
        # offsets are counted and kept in a max-heap (negated, stale entries skipped).
        self.padded = spec.profile.decode_context == "padded"
        self.offsets: dict[int, int] = {}
        self.offset_heap: list[int] = []
        self.n_prefill_steps = 0
        self.busy_s = 0.0
        self.done_prefill: list[p.RunPrefill] = []  # prompts the running step completes
        self.pre_preempted: list[str] = []  # dropped for room as the running step started

    # --- accounting --------------------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _take(self, n: int) -> bool:
        if n > self.free:
            return False
        self.free -= n
        return True

    @property
    def used(self) -> int:
        return self.num_blocks - self.free

    # --- coordinator messages ------------------------------------------------------------------------

    def handle(self, msg: Any) -> None:
        if self.busy and self.defer:
            self.inbox.append(msg)
            return
        self._apply(msg)
        self.kick()

    def read_inbox(self) -> None:
        """Apply what came during the step that just ended, all before the next step starts."""
        inbox, self.inbox = self.inbox, []
        for msg in inbox:
            self._apply(msg)

    def _apply(self, msg: Any) -> None:
        t = type(msg)
        if t is p.RunPrefill:
            self.prefill_queue.append([msg, len(msg.prompt_token_ids), False])
        elif t is p.SendKV:
            self.send_orders[msg.request_id] = msg
            self.sim.try_transfer(msg.request_id)
        elif t is p.ReceiveKV:
            self.to_receive.append(msg)
            self._post_receives()
        elif t is p.ExtendReservation:
            self._extend(msg.request_id, msg.reserve_tokens)
        elif t is p.Preempt:
            self._preempt(msg.request_id, msg.mode)
        elif t is p.Resume:
            seq = self.parked.pop(msg.request_id, None)
            if seq is not None:
                seq.cap = msg.reserve_tokens
                self.to_resume.append(seq)
        elif t is p.AbortWork:
            self._abort(msg.request_id)

    def kick(self) -> None:
        if not self.busy:
            self.sim.start_step(self)

    def _post_receives(self) -> None:
        while self.to_receive:
            msg = self.to_receive[0]
            n = self.blocks_for(len(msg.prompt_token_ids))
            if not self._take(n):
                return
            self.to_receive.popleft()
            req = self.sim.lifecycle.requests[msg.request_id]
            target = min(self.sim.true_lengths[msg.request_id], msg.params.max_tokens)
            seq = _Seq(self, msg.request_id, len(msg.prompt_token_ids), target, msg.params.max_tokens, len(req.output_token_ids),
                       n, msg.reserve_tokens, req)
            self.receiving[msg.request_id] = seq
            self.sim.try_transfer(msg.request_id)

    def _extend(self, rid: str, tokens: int) -> None:
        seq = self.capped.pop(rid, None)
        if seq is not None:
            seq.cap = tokens
            self.arrived.append(seq)  # back in the batch at the next step
            return
        seq = self.running.get(rid) or self.receiving.get(rid)
        if seq is None:
            for s in (*self.arrived, *self.local_waiting):
                if s.rid == rid:
                    seq = s
        if seq is not None:
            seq.cap = tokens
            if seq.active:
                self._leave(seq)
                self._join(seq)

    def _preempt(self, rid: str, mode: str) -> None:
        seq = self.running.get(rid) or self.capped.get(rid)
        if seq is None:
            seq = next((s for s in self.arrived if s.rid == rid), None)
            if seq is None:
                return  # finished before the order arrived
            self.arrived.remove(seq)
        elif seq.active:
            self._leave(seq)
            del self.running[rid]
        else:
            del self.capped[rid]
        seq.sync()
        if mode == "swap" and seq.blocks > self.host_free:
            mode = "recompute"
        if mode == "swap":
            self.host_free -= seq.blocks
            seq.host_blocks = seq.blocks
            self.extra_s += seq.blocks * self.block_size * self.swap_s_per_token
        self.free += seq.blocks
        seq.blocks = 0
        seq.mode = mode
        self.parked[rid] = seq
        self.sim.to_coordinator(p.Preempted(self.rank, rid, mode, self.free))

    def _abort(self, rid: str) -> None:
        self.prefill_queue = deque(e for e in self.prefill_queue if e[0].request_id != rid or self._free_entry(e))
        if rid in self.held:
            self.free += self.held.pop(rid)
        self.send_orders.pop(rid, None)
        self.to_receive = deque(m for m in self.to_receive if m.request_id != rid)
        seq = self.receiving.pop(rid, None) or self.capped.pop(rid, None) or self.parked.pop(rid, None)
        if seq is None and rid in self.running:
            seq = self.running.pop(rid)
            self._leave(seq)
        for q in (self.arrived, self.local_waiting, self.to_resume):
            for s in [s for s in q if s.rid == rid]:
                q.remove(s)
                seq = s
        if seq is not None:
            seq.detach()
            self.free += seq.blocks
            self.host_free += seq.host_blocks
            seq.blocks = seq.host_blocks = 0
        self.sim.to_coordinator(p.Released(self.rank, rid))

    def _free_entry(self, entry: list[Any]) -> bool:
        if entry[2]:
            self.free += entry[2]
        return False

    # --- the decode batch ---------------------------------------------------------------------------

    def _join(self, seq: _Seq) -> None:
        """`seq` (holding blocks_for(prompt + produced)) joins the running batch."""
        seq.active, seq.joined = True, self.steps
        seq.version += 1
        ctx = seq.prompt + seq.produced
        self.sum_ctx += ctx
        seq.cls = (ctx - self.steps - 1) % self.block_size
        self.classes[seq.cls] += 1
        if self.padded:
            off = ctx - self.steps
            self.offsets[off] = self.offsets.get(off, 0) + 1
            heapq.heappush(self.offset_heap, -off)
        self._schedule_event(seq)

    def _leave(self, seq: _Seq) -> None:
        """`seq` leaves the running batch; `seq.blocks` is what it holds then."""
        seq.sync()
        seq.active = False
        seq.version += 1
        ctx = seq.prompt + seq.produced
        self.sum_ctx -= ctx
        self.classes[seq.cls] -= 1
        seq.blocks = self.blocks_for(ctx - (self.ungranted and seq.granted != self.steps))
        if self.padded:
            self.offsets[seq.prompt + seq.produced - seq.joined] -= 1

    def max_ctx(self) -> int:
        """The longest context in the running batch (padded profiles only)."""
        heap, offsets = self.offset_heap, self.offsets
        while heap and not offsets.get(-heap[0]):
            offsets.pop(-heapq.heappop(heap), None)
        return self.steps + -heap[0] if heap else 0

    def _schedule_event(self, seq: _Seq) -> None:
        """Push the step (after `self.steps`) at which something next happens to `seq`."""
        q = seq.produced  # synced: produced after `self.steps` steps
        k = seq.target - q  # steps until it ends
        ahead = self.sim.extend_ahead
        pred = seq.req.predicted_tokens
        if ahead and pred is not None and pred < seq.max_tokens and seq.near_for != pred:
            k = min(k, max(1, pred - ahead - q))
        if seq.cap is not None:  # its next token would need a block past its reservation then
            k = min(k, self.blocks_for(seq.cap) * self.block_size + 1 - seq.prompt - q)
        k = max(k, 1)
        heapq.heappush(self.heap, (self.steps + k, next(self.sim.ties), seq.rid, seq.version))

    def _at_cap(self, seq: _Seq) -> bool:
        """Whether the token the next step writes needs a block past `seq`'s reservation."""
        return seq.cap is not None and self.blocks_for(seq.prompt + seq.produced) > self.blocks_for(seq.cap)

    def _hold_at_cap(self, seq: _Seq) -> None:
        """Out of the batch until its reservation is extended."""
        self._leave(seq)
        del self.running[seq.rid]
        self.capped[seq.rid] = seq

    def _drop_for_room(self, seq: _Seq, preempted: list[str]) -> None:
        """Out of the batch, its blocks freed, to come back (recomputed) when there is room, as
        a live worker drops its newest requests when its pool runs out."""
        if seq.active:
            self._leave(seq)
            del self.running[seq.rid]
        self.free += seq.blocks
        seq.blocks = 0
        self.local_waiting.appendleft(seq)
        preempted.append(seq.rid)

    def _grow_exhausted(self, cls: int, preempted: list[str]) -> None:
        """This step's requests of class `cls` each need a block and the pool has fewer: in batch
        order each takes one, or the newest request (maybe itself) is dropped to make room."""
        for seq in [s for s in self.running.values() if s.cls == cls]:
            while seq.active:
                if self.free:
                    self.free -= 1
                    seq.granted = self.steps
                    break
                self._drop_for_room(next(reversed(self.running.values())), preempted)

    def _rejoin(self, step_prefill: list[int], preempted: list[str]) -> None:
        """Requests coming back into the batch at this step start (cost added to the step)."""
        for seq in self.arrived:
            if self._at_cap(seq):
                self.capped[seq.rid] = seq
                continue
            need = self.blocks_for(seq.prompt + seq.produced)
            if not self._take(need - seq.blocks):
                self._drop_for_room(seq, preempted)  # it would be the newest: no room even for itself
                continue
            seq.blocks = need
            self.running[seq.rid] = seq
            self._join(seq)
        self.arrived.clear()
        for q in (self.to_resume, self.local_waiting):
            while q:
                seq = q[0]
                # Back only with room for its KV and the token this step writes, so it never
                # has to be dropped again at once.
                need = self.blocks_for(seq.prompt + seq.produced)
                if not self._take(need):
                    break
                q.popleft()
                seq.blocks = need
                if seq.host_blocks:
                    self.extra_s += seq.host_blocks * self.block_size * self.swap_s_per_token
                    self.host_free += seq.host_blocks
                    seq.host_blocks = 0
                else:
                    step_prefill.append(seq.prompt + seq.produced - 1)  # recomputed KV
                seq.mode = None
                seq.near_for = -1  # the coordinator forgot it was near its reservation when it left
                seq.rejoined = True
                self.rejoined.append(seq)
                self.running[seq.rid] = seq
                self._join(seq)
                if self._at_cap(seq):
                    self._hold_at_cap(seq)

    def start(self) -> float | None:
        """Start a step if there is work: returns its duration in seconds (None: idle)."""
        prefill_lens: list[int] = []
        self.pre_preempted = []
        decode = self.role != "prefill"
        if decode and (self.arrived or self.to_resume or self.local_waiting):
            # Joining requests get room for the token this step writes (growth of those already
            # running was made at the end of the previous step).
            self._rejoin(prefill_lens, self.pre_preempted)
        n = len(self.running) if decode else 0
        cross = 0
        if self.role != "decode" and self.prefill_queue:
            cross = self._take_prefill(prefill_lens, self.budget - n)
        ms = 0.0
        if prefill_lens:
            ms += self.profile.prefill_ms(sum(prefill_lens), sum(x * x for x in prefill_lens) + cross)
        if n:
            ms += self.profile.decode_ms(n, self.sum_ctx, self.max_ctx() if self.padded else None)
        self.step_batch = n
        if not ms and not self.extra_s:
            if self.pre_preempted:
                self.sim.to_coordinator(DecodeProgress(self.rank, [], [], self.pre_preempted, []))
            return None
        seconds = ms / 1e3 + self.extra_s
        self.extra_s = 0.0
        self.busy_s += seconds
        return seconds

    def _take_prefill(self, lens: list[int], budget: int) -> int:
        """Queued prompts (or chunks) into `lens` up to `budget` tokens. Returns Σ n·s over the
        chunks of n tokens that continue a prompt after s done ones: their queries attend to
        those s keys too, so the step's Σl² term is Σn² + Σn·s (as engine/sim.py costs it)."""
        mixed = self.role == "mixed"
        cross = 0
        while self.prefill_queue:
            entry = self.prefill_queue[0]
            msg, left, taken = entry
            if not taken:
                n = self.blocks_for(len(msg.prompt_token_ids) + (1 if mixed else 0))
                if not self._take(n):
                    return cross  # no room for its KV yet
                entry[2] = n
            if self.chunked:  # chunked prefill under the budget (left by decoding, on a mixed worker)
                if budget <= 0:
                    return cross
                chunk = min(left, budget)
            else:  # whole prompts; a prompt over the budget runs alone
                if lens and left > budget:
                    return cross
                chunk = left
            cross += chunk * (len(msg.prompt_token_ids) - left)
            lens.append(chunk)
            budget -= chunk
            entry[1] = left - chunk
            if entry[1] > 0:
                return cross
            self.prefill_queue.popleft()
            self.done_prefill.append(msg)
        return cross

    def finish_step(self) -> None:
        """The step started by `start` has ended: apply what it did."""
        sim = self.sim
        if self.done_prefill:
            self.n_prefill_steps += 1
            done, self.done_prefill = self.done_prefill, []
            for msg in done:
                self._prefill_done(msg)
        if self.role == "prefill":
            self.sim.views[self.rank].free_blocks = self.free
            return
        n = self.step_batch
        finished: list[tuple[str, str]] = []
        near: list[str] = []
        resumed: list[str] = []
        if self.rejoined:
            resumed = [s.rid for s in self.rejoined if s.rejoined and s.active]
            for s in self.rejoined:
                s.rejoined = False
            self.rejoined.clear()
        preempted = self.pre_preempted
        if n:
            self.steps += 1
            self.sum_ctx += n
            self.ungranted = 1
            heap = self.heap
            if heap and heap[0][0] <= self.steps:
                self._due(finished, near)
            grow = self.classes[-self.steps % self.block_size]
            if grow <= self.free:
                self.free -= grow
            else:
                self._grow_exhausted(-self.steps % self.block_size, preempted)
            self.ungranted = 0
            sim.views[self.rank].decode_steps = self.steps
        sim.views[self.rank].free_blocks = self.free
        # A step that changed nothing but its clock and the blocks it took cannot make waiting
        # work fit (room only grows when something ends, moves or is preempted, and each of
        # those is a message that asks for a new round), so the coordinator is asked only then.
        if finished or near or preempted or resumed:
            sim.to_coordinator(DecodeProgress(self.rank, finished, resumed, preempted, near))
        if finished and self.to_receive:
            self._post_receives()

    def _due(self, finished: list[tuple[str, str]], near: list[str]) -> None:
        """The requests something happens to at this step: their end, nearing their reservation,
        reaching it. Endings first: their blocks are free before anyone needs room, and a request
        that has just produced its last token is never taken as a victim."""
        sim, heap = self.sim, self.heap
        due: list[_Seq] = []
        while heap and heap[0][0] <= self.steps:
            _, _, rid, version = heapq.heappop(heap)
            seq = self.running.get(rid)
            if seq is not None and seq.version == version:
                seq.sync()
                due.append(seq)
        growing = []
        for seq in due:
            if seq.produced >= seq.target:
                self._leave(seq)
                del self.running[seq.rid]
                seq.detach()
                self.free += seq.blocks
                seq.blocks = 0
                finished.append((seq.rid, "length" if seq.produced >= seq.max_tokens else "stop"))
            else:
                growing.append(seq)
        for seq in growing:
            pred = seq.req.predicted_tokens
            if (sim.extend_ahead and pred is not None and pred < seq.max_tokens and seq.near_for != pred
                    and seq.produced + sim.extend_ahead >= pred):
                seq.near_for = pred
                near.append(seq.rid)
            if self._at_cap(seq):
                self._hold_at_cap(seq)
            else:
                self._schedule_event(seq)

    def _prefill_done(self, msg: p.RunPrefill) -> None:
        sim = self.sim
        rid = msg.request_id
        true_len = sim.true_lengths[rid]
        done = min(true_len, msg.params.max_tokens) <= 1
        blocks = self.blocks_for(len(msg.prompt_token_ids) + (1 if msg.decode_locally else 0))
        sim.to_coordinator(p.PrefillDone(self.rank, rid, 0, "length" if done else None))
        if done:
            self.free += blocks
        elif msg.decode_locally:
            req = sim.lifecycle.requests.get(rid)
            if req is None:
                self.free += blocks
                return
            max_tokens = msg.params.max_tokens
            seq = _Seq(self, rid, len(msg.prompt_token_ids), min(true_len, max_tokens), max_tokens, 1, blocks, None, req)
            self.arrived.append(seq)
        else:
            self.held[rid] = blocks
            sim.try_transfer(rid)

    def kv_arrived(self, rid: str) -> None:
        seq = self.receiving.pop(rid, None)
        if seq is None:
            return
        self.arrived.append(seq)
        self.sim.to_coordinator(p.TransferStatus(self.rank, rid, "done", ""))
        self.kick()

    def leaks(self) -> list[str]:
        out = []
        if self.free != self.num_blocks:
            out.append(f"rank {self.rank}: {self.num_blocks - self.free} device blocks still held")
        if self.host_free != self.host_total:
            out.append(f"rank {self.rank}: {self.host_total - self.host_free} host blocks still held")
        return out


# --- the simulator ---------------------------------------------------------------------------------


@dataclass
class RequestResult:
    arrival_s: float
    prompt_len: int
    output_len: int
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    finish_reason: str
    preemptions: int
    queue_ms: float = 0.0  # the coordinator's split of TTFT and the gap before decoding (RequestFinished)
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0


@dataclass
class SimResult:
    requests: list[RequestResult]
    duration_s: float  # simulated time until the last request ended
    counters: dict[str, float]
    kv_samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, used, reserved, capacity) decode side
    schedule_calls: int = 0
    events: int = 0
    worker_busy: dict[int, float] = field(default_factory=dict)  # rank -> busy share of the run
    stopped_early: bool = False  # more requests missed their SLOs than the allowance


class Simulator:
    """Run one workload through the coordinator policy on simulated instances."""

    def __init__(self, policy: Policy, instances: Sequence[InstanceSpec], hw: HardwareConfig | None = None,
                 sample_every_s: float = 1.0) -> None:
        self.hw = hw or HardwareConfig()
        self.now = 0.0
        self.events: list[tuple[float, int, int, Any]] = []  # (time, tie, kind, payload)
        self.ties = itertools.count()
        self.dirty = False
        self.true_lengths: dict[str, int] = {}
        self.results: dict[str, RequestResult] = {}
        self.meta: dict[str, tuple[float, int, Request]] = {}
        self.sample_every_s = sample_every_s
        expected = [ExpectedRank(rank, s.role) for rank, s in enumerate(instances)]
        self.registry = WorkerRegistry(expected, "", heartbeat_timeout_s=1e18)
        self.workers: list[SimWorker] = []
        for rank, spec in enumerate(instances):
            kv = self.hw.kv_bytes_per_token or kv_bytes_per_token(spec.profile)
            blocks = spec.num_blocks or (spec.profile.max_num_tokens or 0) // self.hw.block_size
            if blocks < 1:
                raise ValueError(f"instance {rank} ({spec.profile.name}): no KV capacity; give num_blocks or a profile "
                                 "with max_num_tokens")
            w = SimWorker(self, rank, spec, self.hw, blocks, kv)
            self.workers.append(w)
            self.registry.views[rank] = WorkerView(
                rank, spec.role, blocks, self.hw.block_size, w.budget, blocks, kv_bytes_per_token=kv,
            )
            self.registry.last_seen[rank] = math.inf
        self.views = self.registry.views
        self.lifecycle = SimLifecycle(
            policy, self.registry, NullCodec(), self._to_client, self._to_worker, CoordinatorConfig(),  # type: ignore[arg-type]
            clock=lambda: self.now,
        )
        self.extend_ahead = policy.extend_ahead
        self.schedule_calls = 0
        self.n_events = 0
        self.misses = 0  # requests certainly past their SLOs (this run)
        self.end_s = 0.0  # when the last request ended
        self.slo_ttft_ms: float | None = None
        self.slo_tpot_ms: float | None = None
        self.prompt_tokens: Sequence[Sequence[int]] | None = None
        self.kv_samples: list[tuple[float, int, int, int]] = []

    # --- plumbing ------------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.events, (t, next(self.ties), kind, payload))

    def _to_worker(self, rank: int, msg: Any) -> None:
        self.workers[rank].handle(msg)

    def to_coordinator(self, msg: Any) -> None:
        self.lifecycle.on_worker_message(msg)
        self.dirty = True

    def _to_client(self, client: bytes, msg: Any) -> None:
        if isinstance(msg, p.RequestFinished):
            arrival, prompt, req = self.meta.pop(msg.request_id)
            self.results[msg.request_id] = RequestResult(
                arrival, prompt, len(msg.token_ids), msg.ttft_ms, msg.tpot_ms, msg.e2e_ms, msg.finish_reason,
                req.num_preemptions, msg.queue_ms, msg.prefill_ms, msg.transfer_ms,
            )
            self.end_s = max(self.end_s, self.now)
            if (self.slo_ttft_ms is not None and msg.ttft_ms > self.slo_ttft_ms) or (
                    self.slo_tpot_ms is not None and msg.tpot_ms > self.slo_tpot_ms):
                self.misses += 1
        elif isinstance(msg, p.ErrorReply) and msg.request_id in self.meta:
            assert msg.request_id is not None
            arrival, prompt, _ = self.meta.pop(msg.request_id)
            self.results[msg.request_id] = RequestResult(arrival, prompt, 0, math.inf, math.inf, math.inf, "error", 0)
            self.misses += 1

    def start_step(self, w: SimWorker) -> None:
        seconds = w.start()
        if seconds is not None:
            w.busy = True
            heapq.heappush(self.events, (self.now + seconds, next(self.ties), _STEP, w))

    def try_transfer(self, rid: str) -> None:
        """Start moving `rid`'s KV once the sender holds it, has the order, and the receiver has posted."""
        req = self.lifecycle.requests.get(rid)
        if req is None or req.prefill_rank is None:
            return
        src = self.workers[req.prefill_rank]
        order = src.send_orders.get(rid)
        if order is None or rid not in src.held:
            return
        dst = self.workers[order.dst_rank]
        if rid not in dst.receiving:
            return
        del src.send_orders[rid]
        tokens = req.num_prompt_tokens
        start = max(self.now, src.link_free_at)
        end = start + tokens * src.link_s_per_token + src.link_latency_s
        src.link_free_at = end
        self._push(end, _TRANSFER, (src, dst, rid))

    # --- running -------------------------------------------------------------------------------------

    def run(self, workload: Iterable[WorkloadRequest], slo_ttft_ms: float | None = None,
            slo_tpot_ms: float | None = None, progress: Callable[[int], None] | None = None,
            max_sim_s: float = math.inf, miss_allowance: int | None = None,
            prompt_tokens: Sequence[Sequence[int]] | None = None) -> SimResult:
        """Run every request to its end. With `miss_allowance`, stop once more requests than that
        have certainly missed their SLOs (finished late, or still without a first token past
        their TTFT bound): the bisection then knows the attainment goal is out of reach.
        `prompt_tokens[i]`, when given, is request i's prompt (a predictor that reads the prompt
        needs it); otherwise prompts are placeholders of the right length."""
        self.prompt_tokens = prompt_tokens
        self.slo_ttft_ms, self.slo_tpot_ms = slo_ttft_ms, slo_tpot_ms
        self.misses = 0
        self.end_s = 0.0
        stopped = False
        # Arrivals are read in time order beside the event heap (which then holds only the
        # workers' few pending events, so each push and pop is cheap).
        arrivals = sorted(((item.arrival_s, i, item) for i, item in enumerate(workload)), key=lambda x: (x[0], x[1]))
        n = len(arrivals)
        if n and self.sample_every_s > 0:
            self._push(0.0, _SAMPLE, None)
        lc = self.lifecycle
        done_before = 0
        sampled = False
        nxt = 0
        inf = math.inf
        while self.events or nxt < n:
            t = min(self.events[0][0] if self.events else inf, arrivals[nxt][0] if nxt < n else inf)
            if t > max_sim_s:
                break
            self.now = t
            while nxt < n and arrivals[nxt][0] == t:
                _, i, item = arrivals[nxt]
                nxt += 1
                self.n_events += 1
                self._arrive(f"r{i}", item, slo_ttft_ms, slo_tpot_ms)
            while self.events and self.events[0][0] == t:
                _, _, kind, payload = heapq.heappop(self.events)
                self.n_events += 1
                if kind == _STEP:
                    payload.busy = False
                    payload.finish_step()
                    if payload.inbox:
                        payload.read_inbox()
                    if not payload.busy:
                        self.start_step(payload)
                elif kind == _TRANSFER:
                    src, dst, rid = payload
                    if rid in src.held:
                        src.free += src.held.pop(rid)
                        self.to_coordinator(p.TransferStatus(src.rank, rid, "done", ""))
                        src.kick()
                    dst.kv_arrived(rid)
                elif kind == _SAMPLE:
                    self._sample()
                    if miss_allowance is not None and slo_ttft_ms is not None:
                        late = sum(1 for r in lc.requests.values() if r.status in _NO_FIRST_TOKEN
                                   and (t - r.arrival) * 1e3 > slo_ttft_ms)
                        stopped = self.misses + late > miss_allowance
                    sampled = True
            if self.dirty:
                self.dirty = False
                # A round with every queue empty decides nothing (no policy acts without a waiting
                # prompt, KV, extension or resume), so it is skipped.
                if lc.waiting or lc.kv_waiting or lc.near_limit or lc.preempted:
                    for w in self.workers:
                        self.views[w.rank].free_blocks = w.free
                    self.schedule_calls += 1
                    lc.schedule()  # workers given work start their steps as they handle it
            if sampled:
                sampled = False
                if nxt < n or any(e[2] != _SAMPLE for e in self.events) or any(w.busy for w in self.workers):
                    self._push(t + self.sample_every_s, _SAMPLE, None)
                elif lc.requests:  # nothing can happen any more, yet requests are live: a bug
                    raise RuntimeError(self._stall_report())
            if miss_allowance is not None and self.misses > miss_allowance:
                stopped = True
            if stopped:
                break
            if progress is not None and len(self.results) != done_before:
                progress(len(self.results) - done_before)
                done_before = len(self.results)
        results = [self.results[f"r{i}"] for i in range(n) if f"r{i}" in self.results]
        busy = {w.rank: (w.busy_s / self.now if self.now else 0.0) for w in self.workers}
        counters = {k: float(v) for k, v in lc.counters.items()}
        counters["unfinished"] = float(n - len(results))
        return SimResult(results, self.end_s, counters, self.kv_samples, self.schedule_calls, self.n_events, busy, stopped)

    def _arrive(self, rid: str, w: WorkloadRequest, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> None:
        prompt = list(self.prompt_tokens[int(rid[1:])]) if self.prompt_tokens is not None else [1] * w.prompt_len
        req = Request(
            request_id=rid, client=b"sim", client_request_id=rid, prompt_token_ids=prompt,
            params=SamplingParams(max_tokens=w.output_len, temperature=0.0), stream=False,
            slo=SLO(slo_ttft_ms, slo_tpot_ms), arrival=self.now,
            output_token_ids=TokenCount(),  # type: ignore[arg-type]
        )
        req.true_length = w.output_len
        self.true_lengths[rid] = w.output_len
        self.meta[rid] = (w.arrival_s, w.prompt_len, req)
        self.lifecycle.admit(req)
        self.dirty = True

    def _stall_report(self) -> str:
        lc = self.lifecycle
        live = ", ".join(f"{r.request_id} {r.status.name} out={len(r.output_token_ids)} pred={r.predicted_tokens}"
                         for r in list(lc.requests.values())[:5])
        return (f"simulation stalled at t={self.now:.3f} s with {len(lc.requests)} requests live and no event left "
                f"(first: {live}); waiting {len(lc.waiting)}, near limit {len(lc.near_limit)}, preempted "
                f"{len(lc.preempted)}")

    def _sample(self) -> None:
        used = reserved = cap = 0
        for w in self.workers:
            if w.role == "prefill":
                continue
            used += w.used
            cap += w.num_blocks
            led = self.lifecycle.ledger.ranks.get(w.rank)
            reserved += (led.reserved_blocks if led else 0) + self.views[w.rank].reserved_blocks
        self.kv_samples.append((self.now, used, reserved, cap))

    def assert_no_leaks(self) -> None:
        problems = [f for w in self.workers for f in w.leaks()] + lifecycle_leaks(self.lifecycle)
        if problems:
            raise AssertionError("; ".join(problems))


_STEP, _ARRIVAL, _TRANSFER, _SAMPLE = 0, 1, 2, 3
_NO_FIRST_TOKEN = (S.WAITING_PREFILL, S.PREFILLING)

# K and V bytes per token over all layers in fp16 (2 · layers · hidden · 2) for the models the
# bundled profiles describe; a fitted profile carries its own `kv_bytes_per_token`.
_MODEL_KV_BYTES = {"opt-13b": 2 * 40 * 5120 * 2, "opt-66b": 2 * 64 * 9216 * 2, "opt-175b": 2 * 96 * 12288 * 2}


def kv_bytes_per_token(profile: LatencyProfile) -> int:
    """KV bytes per token of the profile's model (all GPUs of the instance together)."""
    own = getattr(profile, "kv_bytes_per_token", None)
    if own:
        return int(own)
    name = profile.name.removeprefix("vllm-").rsplit("-tp", 1)[0]
    if name not in _MODEL_KV_BYTES:
        raise ValueError(f"profile {profile.name!r} does not say its KV bytes per token; set HardwareConfig.kv_bytes_per_token")
    return _MODEL_KV_BYTES[name]

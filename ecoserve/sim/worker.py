"""The simulated worker: prefill, decode or mixed, advanced one step per event by the latency model.

It speaks the worker side of the protocol (`RunPrefill`, `SendKV`, `ReceiveKV`, `Preempt`,
`Resume`, `ExtendReservation`, `AbortRequest`, ...) against the real coordinator, and models
step times with the instance's `LatencyProfile` (see `ecoserve.sim.simulator` for the rules).
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING, Any

from ecoserve import protocol as p
from ecoserve.coordinator.request import Request, RequestStatus as S
from ecoserve.sim.instance import HardwareConfig, InstanceSpec
from ecoserve.sim.lifecycle import DecodeProgress, TokenCount

if TYPE_CHECKING:
    from ecoserve.sim.simulator import Simulator


class _Seq:
    """A request on a decode (or mixed) worker."""

    __slots__ = (
        "rid", "prompt", "target", "max_tokens", "produced", "joined", "blocks", "cap", "version", "active",
        "host_blocks", "mode", "worker", "count", "near_for", "req", "rejoined", "cls", "granted", "tpot",
    )

    def __init__(self, worker: SimWorker, rid: str, prompt: int, target: int, max_tokens: int, produced: int,
                 blocks: int, cap: int | None, req: Request, tpot: float | None = None) -> None:
        self.worker, self.rid, self.prompt, self.target, self.max_tokens = worker, rid, prompt, target, max_tokens
        self.produced, self.joined, self.blocks, self.cap, self.req = produced, 0, blocks, cap, req
        self.tpot = tpot  # the step time its worker keeps to while it decodes ("slo" schedule)
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


class SimWorker:
    def __init__(self, sim: Simulator, rank: int, spec: InstanceSpec, hw: HardwareConfig, num_blocks: int,
                 kv_bytes_per_token: int) -> None:
        self.sim, self.rank, self.role, self.tp = sim, rank, spec.role, spec.tp
        self.profile = spec.profile
        self.block_size = hw.block_size
        # A mixed worker of a prefill-priority policy (vllm's mode) runs whole prompts, no decodes,
        # while prompts wait: its steps are prefill steps, under the prefill budget.
        self.prefill_first = spec.role == "mixed" and sim.mixed_schedule == "prefill-priority"
        # EcoServe's iteration ("slo"): each step's prompt tokens are the most the profile predicts
        # within the smallest TPOT target of the requests decoding (`tpots`); a step with nothing
        # decoding takes up to the prefill budget.
        self.slo_budget = spec.role == "mixed" and sim.mixed_schedule == "slo"
        mixed_budget = spec.role == "mixed" and not self.prefill_first and not self.slo_budget
        self.budget = hw.mixed_token_budget if mixed_budget else hw.prefill_token_budget
        self.tpots: dict[float, int] = {}  # TPOT target -> running requests holding it
        self.n_mixed_steps = 0  # steps carrying prompt tokens and decodes
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
        self.newly_capped = False  # a request came to its cap since the last report
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
                       n, msg.reserve_tokens, req, msg.tpot_target_ms)
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
        if self.to_receive:  # the room it freed may be what a posted receive waits for
            self._post_receives()

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
        if self.to_receive:
            self._post_receives()

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
        if seq.tpot is not None:
            self.tpots[seq.tpot] = self.tpots.get(seq.tpot, 0) + 1
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
        if seq.tpot is not None:
            self.tpots[seq.tpot] -= 1
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
        self._cap(seq)

    def _cap(self, seq: _Seq) -> None:
        # Reaching its cap is news: the policy extends a request early only when room allows and
        # otherwise waits for it to use up its prediction, then makes room. A live worker reports
        # every step; this one reports only news, so the end of the step must ask for a round.
        self.capped[seq.rid] = seq
        self.newly_capped = True

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
                self._cap(seq)
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
        if self.prefill_first and self.prefill_queue:
            # Prefill-priority: whole prompts up to the budget, and the decodes wait for a step
            # without them; only when no waiting prompt fits (no room for its KV) do they run.
            self._take_prefill(prefill_lens, self.budget, whole=True)
            decode = not prefill_lens
        if decode and (self.arrived or self.to_resume or self.local_waiting):
            # Joining requests get room for the token this step writes (growth of those already
            # running was made at the end of the previous step).
            self._rejoin(prefill_lens, self.pre_preempted)
        n = len(self.running) if decode else 0
        cross = 0
        if self.role != "decode" and self.prefill_queue and not self.prefill_first:
            cross = self._take_prefill(prefill_lens, self._slo_budget(n) if self.slo_budget else self.budget - n)
        if prefill_lens and n:
            self.n_mixed_steps += 1
        # One step, prefill chunks and decodes alike: the profile's mixed-step form (fused or
        # additive) prices a step holding both; one holding only one is that side's own step.
        sum_len, sum_sq = sum(prefill_lens), sum(x * x for x in prefill_lens) + cross
        ms = self.profile.mixed_ms(sum_len, sum_sq, n, self.sum_ctx, self.max_ctx() if self.padded and n else None)
        self.step_batch, self.step_prompt_tokens = n, sum_len
        if not ms and not self.extra_s:
            if self.pre_preempted:
                self.sim.to_coordinator(DecodeProgress(self.rank, [], [], self.pre_preempted, []))
            return None
        seconds = ms / 1e3 + self.extra_s
        self.extra_s = 0.0
        self.busy_s += seconds
        return seconds

    def _slo_budget(self, n: int) -> int:
        """Prompt tokens this step may carry beside its `n` decodes (the "slo" schedule)."""
        tpots = [t for t, k in self.tpots.items() if k]
        if not n or not tpots:
            return self.budget if not n else max(0, self.budget - n)  # no TPOT at stake
        head = self.prefill_queue[0]
        done = len(head[0].prompt_token_ids) - head[1]  # computed by earlier chunks
        return self.profile.prompt_budget(min(tpots), n, self.sum_ctx, self.max_ctx() if self.padded else None,
                                          cap=self.budget, done=done)

    def _take_prefill(self, lens: list[int], budget: int, whole: bool = False) -> int:
        """Queued prompts (or chunks; `whole`: never chunked) into `lens` up to `budget` tokens. Returns Σ n·s over the
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
            if self.chunked and not whole:  # chunked prefill under the budget (left by decoding, on a mixed worker)
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
        # those is a message that asks for a new round), so the coordinator is asked only then,
        # or when a request came to its cap (the policy may now make room for it).
        if finished or near or preempted or resumed or self.newly_capped:
            self.newly_capped = False
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
            seq = _Seq(self, rid, len(msg.prompt_token_ids), min(true_len, max_tokens), max_tokens, 1, blocks,
                       msg.reserve_tokens, req, msg.tpot_target_ms)
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

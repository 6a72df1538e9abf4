"""The decode worker: receives each request's prompt KV into reserved blocks, then decodes it
with continuous batching and streams one TokenEvents message per step.

The `mixed` role is this worker also taking whole requests (RunPrefill with decode_locally):
prefill and decode share one pool and one batch, as in colocated (vLLM-style) serving. A mixed
worker takes ReceiveKV too (a prefill worker's prompt moved to it, P:mixed layouts). Under the
"slo" schedule (EcoServe's iteration) each step's prompt tokens are budgeted by the smallest
`tpot_target_ms` (RunPrefill/ReceiveKV) of the requests decoding in it.
When the pool runs dry the local scheduler preempts the newest request by recompute; it
resumes on this worker by re-prefilling its prompt and the tokens it already produced.

Under a reserving policy (`ecoserve`) the coordinator also gives each request a reservation
(`ReceiveKV.reserve_tokens`, raised by `ExtendReservation`): the request never holds more KV
than that, and waits at its cap until extended. `Preempt` parks a request, its KV swapped to
the host swap space (`--num-host-blocks`) or dropped to recompute, and `Resume` brings it back.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ecoserve import protocol as p
from ecoserve.engine.sequence import Sequence
from ecoserve.runtime.rank import Worker, local_deadline
from ecoserve.kv_transfer.types import TransferPlan, TransferState


class DecodeWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_receive: deque[p.ReceiveKV] = deque()  # waiting for free blocks, in arrival order
        self.receiving: dict[str, Sequence] = {}  # receive posted; KV lands in seq.block_table
        self.aborted: set[str] = set()  # aborted before its transfer ended: free when it does
        self.caps: dict[str, int] = {}  # extensions that arrived before the KV did
        self.to_resume: deque[str] = deque()  # resumes waiting for device blocks (swap-in)
        self.all_held = False  # the last step gave no token because every request sat at its cap
        self.prefilling: set[str] = set()  # mixed: local requests whose (re)prefill has not sampled yet
        self.num_receives = 0  # ReceiveKV messages taken (fault injection counts them)
        self.num_tokens_reported = 0  # output tokens sent in TokenEvents (fault injection counts them)

    def handle_work(self, msg: Any) -> None:
        if isinstance(msg, p.ReceiveKV):
            self.to_receive.append(msg)
            self._post_receives()
            self.num_receives += 1
            if self.num_receives == self.faults.die_on_receive:
                self.faults.die(self.rank, f"die_on_receive={self.num_receives}")
        elif isinstance(msg, p.RunPrefill) and msg.decode_locally and self.config.role == "mixed":
            seq = self.engine.new_sequence(msg.request_id, msg.prompt_token_ids, msg.params)
            seq.output_token_ids.extend(msg.generated_token_ids)  # a retry: prefilled after the prompt
            seq.reserved_tokens = msg.reserve_tokens  # as a received request's (ReceiveKV.reserve_tokens)
            seq.tpot_target_ms = msg.tpot_target_ms
            self.engine.scheduler.add(seq)
            self.prefilling.add(msg.request_id)
        elif isinstance(msg, (p.ExtendReservation, p.Preempt, p.Resume)):
            try:
                if isinstance(msg, p.ExtendReservation):
                    self._extend(msg.request_id, msg.reserve_tokens)
                elif isinstance(msg, p.Preempt):
                    self._preempt(msg.request_id, msg.mode)
                else:
                    self._resume(msg.request_id, msg.reserve_tokens)
            except ValueError as exc:  # an order this request cannot take: fail it, not the worker
                self.channel.send(p.WorkerFailed(rank=self.rank, request_id=msg.request_id, message=str(exc)))
        else:
            raise ValueError(f"a {self.config.role} worker does not take {type(msg).__name__}")

    def _post_receives(self) -> None:
        """Allocate blocks and post receives in arrival order while the pool has room."""
        while self.to_receive:
            msg = self.to_receive[0]
            kv_tokens = len(msg.prompt_token_ids) + len(msg.generated_token_ids)  # a retry replays outputs
            need = self.pool.blocks_for_tokens(kv_tokens)
            if need > self.pool.num_free:
                return  # the requests decoding here will free blocks as they finish
            self.to_receive.popleft()
            seq = self.engine.new_sequence(msg.request_id, msg.prompt_token_ids, msg.params)
            self.engine.sequences.pop(msg.request_id)  # not the engine's until the KV is in
            seq.block_table.ensure_capacity(kv_tokens, self.pool)
            seq.output_token_ids.extend(msg.generated_token_ids)
            seq.output_token_ids.append(msg.first_token)
            seq.num_computed_tokens = kv_tokens
            seq.reserved_tokens = msg.reserve_tokens
            seq.tpot_target_ms = msg.tpot_target_ms
            plan = TransferPlan(msg.request_id, msg.src_rank, self.rank, msg.seq_no, kv_tokens)
            # The sender's deadline too; maybe past already (then hollow).
            deadline = local_deadline(msg.deadline_at, self.faults.clock_lag_ms / 1e3)
            self.transfers.recv(plan, list(seq.block_table.blocks), deadline_s=msg.deadline_s, deadline=deadline)
            self.receiving[msg.request_id] = seq

    def has_work(self) -> bool:
        return self.engine.has_unfinished() and not self.all_held

    # --- reservations and preemption by order of the coordinator --------------------------------

    def _extend(self, rid: str, tokens: int) -> None:
        seq = self.engine.sequences.get(rid) or self.receiving.get(rid)
        if seq is None:
            if any(m.request_id == rid for m in self.to_receive):
                self.caps[rid] = tokens
            return  # finished meanwhile
        if rid in self.receiving:
            seq.reserved_tokens = tokens
        else:
            self.engine.set_reservation(rid, tokens)
        self.all_held = False

    def _preempt(self, rid: str, mode: str) -> None:
        eng = self.engine
        seq = eng.sequences.get(rid)
        if seq is None:
            return  # it finished before the order came: the coordinator has its last token
        if mode not in ("swap", "recompute"):
            raise ValueError(f"preempt mode must be 'swap' or 'recompute', got {mode!r}")
        if seq in eng.scheduler.running and seq.num_computed_tokens >= len(seq.prompt_token_ids):
            used = eng.preempt(rid, mode)
        else:
            # Dropped by the local batcher a moment ago and waiting to recompute (or re-prefilling
            # after that): park it as it is, to recompute. A parked one raises in park().
            seq.num_computed_tokens = 0
            eng.scheduler.park(seq)
            seq.preempt_mode = used = "recompute"
            seq.num_preemptions += 1
        self.channel.send(p.Preempted(rank=self.rank, request_id=rid, mode=used, free_blocks=self.pool.num_free))
        self.all_held = False

    def _resume(self, rid: str, tokens: int | None) -> None:
        if rid not in self.engine.sequences:
            return
        self.engine.set_reservation(rid, tokens)
        self.to_resume.append(rid)
        self._resume_waiting()

    def _resume_waiting(self) -> None:
        """Swap-ins wait for device blocks in arrival order; recomputes go straight back."""
        while self.to_resume:
            rid = self.to_resume[0]
            if rid in self.engine.sequences and not self.engine.resume(rid):
                return
            self.to_resume.popleft()
            self.all_held = False

    def poll_transfers(self) -> None:
        for update in self.transfers.poll():
            if not update.state.terminal:
                continue
            rid = update.request_id
            seq = self.receiving.pop(rid)
            if rid in self.aborted or update.state is not TransferState.DONE:
                self.free_transfer_blocks(rid, seq)
            else:
                self.transfers.forget(rid)
            if rid in self.aborted:
                self.aborted.discard(rid)
                self.release(rid)
                continue
            if update.state is TransferState.DONE:
                self.engine.sequences[rid] = seq
                self.engine.scheduler.add_running(seq)
                if rid in self.caps:
                    seq.reserved_tokens = self.caps.pop(rid)
                self.all_held = False
            self.report_transfer(update)
        if self.to_receive:
            self._post_receives()

    def step(self) -> None:
        eng = self.engine
        outs = eng.step()
        ids, tokens, reasons = [], [], []
        for out in outs:
            seq = eng.sequences[out.request_id]
            reason = seq.finish_reason.value if out.finished and seq.finish_reason else None
            if out.finished:
                eng.pop_finished(out.request_id)
            if out.request_id in self.prefilling:
                # A local request's first token (after a retry's replayed ones): its prefill is done.
                self.prefilling.discard(out.request_id)
                self.channel.send(
                    p.PrefillDone(
                        rank=self.rank, request_id=out.request_id, first_token=out.new_token_id,
                        finish_reason=reason, free_blocks=self.pool.num_free,
                    )
                )
                continue
            ids.append(out.request_id)
            tokens.append(out.new_token_id)
            reasons.append(reason)
        preempted = [s.request_id for s in eng.last_preempted]
        self.all_held = eng.last_num_scheduled_tokens == 0 and bool(eng.scheduler.held)
        if ids or preempted:
            self.channel.send(
                p.TokenEvents(
                    rank=self.rank, request_ids=ids, token_ids=tokens, finish_reasons=reasons,
                    preempted=preempted, free_blocks=self.pool.num_free,
                )
            )
            self.num_tokens_reported += len(ids)
            if self.faults.die_after_tokens and self.num_tokens_reported >= self.faults.die_after_tokens:
                self.faults.die(self.rank, f"die_after_tokens={self.faults.die_after_tokens}")
        if self.to_receive:
            self._post_receives()
        if self.to_resume:
            self._resume_waiting()

    def abort(self, request_id: str) -> None:
        eng = self.engine
        if request_id in self.receiving or any(m.request_id == request_id for m in self.to_receive):
            self.aborted.add(request_id)  # the sender is committed to this transfer: finish it, then free
            return
        eng.release(request_id)  # whatever its state here: running, held, parked, swapped
        self.caps.pop(request_id, None)
        self.prefilling.discard(request_id)
        if request_id in self.to_resume:
            self.to_resume.remove(request_id)
        self.release(request_id)

    def peer_lost(self, rank: int) -> None:
        """Receives queued from a lost prefill rank never start (no blocks are taken yet)."""
        super().peer_lost(rank)
        for msg in [m for m in self.to_receive if m.src_rank == rank]:
            self.to_receive.remove(msg)
            self.caps.pop(msg.request_id, None)
            if msg.request_id in self.aborted:
                self.aborted.discard(msg.request_id)
                self.release(msg.request_id)

    def stats(self) -> dict[str, int]:
        return {
            "receiving_requests": len(self.receiving),
            "queued_receives": len(self.to_receive),
            "running": len(self.engine.scheduler.running),
            "waiting": len(self.engine.scheduler.waiting),
            "held_at_reservation": len(self.engine.scheduler.held),
            "parked": len(self.engine.scheduler.parked),
            "reserved_tokens": sum(s.reserved_tokens or 0 for s in self.engine.sequences.values()),
            "swap_free_blocks": self.engine.swap_space.num_free if self.engine.swap_space else 0,
            "swap_used_blocks": self.engine.swap_space.pool.num_used if self.engine.swap_space else 0,
            "mixed_steps": self.engine.num_mixed_steps,  # steps carrying prompt tokens and decodes
            "receives": self.num_receives,  # requests whose KV came from a prefill worker
        }

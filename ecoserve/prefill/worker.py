"""The prefill worker: prompts in, first token out; each prompt's KV is held until the
coordinator names a decode rank to send it to (SendKV), then moved by kv_transfer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ecoserve import protocol as p
from ecoserve.engine.sequence import Sequence
from ecoserve.runtime.rank import Worker, local_deadline
from ecoserve.kv_transfer.types import TransferPlan


@dataclass
class _HeldSend:
    """A send held back by fault injection (drop_send, delay_send_ms): it starts at `due`."""

    plan: TransferPlan
    blocks: list[int]
    deadline_s: float
    deadline: float  # the transfer's one deadline, on time.monotonic()
    due: float  # time.monotonic(); inf: until aborted


class PrefillWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[str, Sequence] = {}  # prompt done, KV waiting for a SendKV
        self.sending: dict[str, Sequence] = {}  # KV being sent
        self.aborted: set[str] = set()  # aborted while sending: free when the transfer ends
        self.held_back: dict[str, _HeldSend] = {}  # tests only: sends not started yet (also in `sending`)
        self.num_sends = 0  # SendKV messages taken (fault injection counts them)

    def handle_work(self, msg: Any) -> None:
        if isinstance(msg, p.RunPrefill):
            seq = self.engine.new_sequence(msg.request_id, msg.prompt_token_ids, msg.params)
            seq.output_token_ids.extend(msg.generated_token_ids)  # a retry: prefilled after the prompt
            self.engine.scheduler.add(seq)
        elif isinstance(msg, p.SendKV):
            self._send(msg)
        else:
            raise ValueError(f"a prefill worker does not take {type(msg).__name__}")

    def _send(self, msg: p.SendKV) -> None:
        self.num_sends += 1
        if self.num_sends == self.faults.die_on_send:
            self.faults.die(self.rank, f"die_on_send={self.num_sends}")
        seq = self.held.pop(msg.request_id, None)
        if seq is None:
            self.channel.send(
                p.TransferStatus(
                    rank=self.rank, request_id=msg.request_id, state="failed",
                    message=f"prefill rank {self.rank} holds no KV for request {msg.request_id!r}",
                )
            )
            return
        num_tokens = seq.num_computed_tokens  # the prompt, and a retry's replayed outputs
        plan = TransferPlan(msg.request_id, self.rank, msg.dst_rank, msg.seq_no, num_tokens)
        blocks = seq.block_table.blocks[: self.pool.blocks_for_tokens(num_tokens)]
        self.sending[msg.request_id] = seq
        deadline = local_deadline(msg.deadline_at, self.faults.clock_lag_ms / 1e3)  # the receiver keeps the same one
        delay = self.faults.send_delay_s(self.num_sends)
        if delay > 0:
            self.held_back[msg.request_id] = _HeldSend(plan, blocks, msg.deadline_s, deadline, time.monotonic() + delay)
            return
        self.transfers.send(plan, blocks, deadline_s=msg.deadline_s, deadline=deadline)

    def _start_held_back(self, rid: str) -> None:
        held = self.held_back.pop(rid)
        self.transfers.send(held.plan, held.blocks, deadline_s=held.deadline_s, deadline=held.deadline)

    def step(self) -> None:
        eng = self.engine
        for out in eng.step():
            seq = eng.sequences[out.request_id]
            if out.finished:  # the first token ended it: nothing to move
                eng.pop_finished(out.request_id)
                reason = seq.finish_reason.value if seq.finish_reason else None
            else:
                eng.scheduler.detach(seq)
                eng.sequences.pop(out.request_id)
                self.held[out.request_id] = seq
                reason = None
            self.channel.send(
                p.PrefillDone(
                    rank=self.rank, request_id=out.request_id, first_token=out.new_token_id, finish_reason=reason,
                    free_blocks=self.pool.num_free,  # the KV held for its transfer counted as used
                )
            )

    def poll_transfers(self) -> None:
        if self.held_back:
            now = time.monotonic()
            for rid in [r for r, h in self.held_back.items() if h.due <= now]:
                self._start_held_back(rid)
        for update in self.transfers.poll():
            if not update.state.terminal:
                continue
            seq = self.sending.pop(update.request_id)
            self.free_transfer_blocks(update.request_id, seq)
            if update.request_id in self.aborted:
                self.aborted.discard(update.request_id)
                self.release(update.request_id)
                continue
            self.report_transfer(update)

    def abort(self, request_id: str) -> None:
        eng = self.engine
        if request_id in self.sending:
            self.aborted.add(request_id)  # the decode side posted its receive: finish, then free
            if request_id in self.held_back:
                self._start_held_back(request_id)  # never skip a seq_no: the pair stays in step
            return
        if request_id in self.held:
            self.held.pop(request_id).block_table.release(self.pool)
        elif request_id in eng.sequences:
            eng.scheduler.abort(eng.sequences.pop(request_id))
        self.release(request_id)

    def peer_lost(self, rank: int) -> None:
        super().peer_lost(rank)
        for rid in [r for r, h in self.held_back.items() if h.plan.dst_rank == rank]:
            del self.held_back[rid]  # never enqueued: nothing can touch its blocks
            self.sending.pop(rid).block_table.release(self.pool)
            if rid in self.aborted:
                self.aborted.discard(rid)
                self.release(rid)

    def stats(self) -> dict[str, int]:
        return {
            "held_requests": len(self.held),
            "sending_requests": len(self.sending),
            "running": len(self.engine.scheduler.running),
            "waiting": len(self.engine.scheduler.waiting),
        }

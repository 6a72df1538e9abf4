"""The `distserve` baseline (DESIGN §4.2), on disaggregated or colocated workers.

1. PT queue, strict FCFS: the head goes to the prefill (or mixed) worker with the fewest queued
   prompt tokens, if that worker has room for the prompt's blocks and its queue is under
   `queue_factor` x its token budget (late binding keeps the queue here, where order is global).
   The head that fits nowhere blocks the queue.
2. After prefill the KV waits on its prefill worker. FCFS over those, a decode worker pulls
   one when its free blocks cover the prompt plus `headroom` of its pool (kept for the growth
   of what it already decodes); the worker with the most free blocks wins. An idle decode
   worker takes any prompt that fits at all, so nothing starves.
3. Decode blocks are taken on demand per token; a decode worker that runs out preempts its
   newest request by recompute (the worker does that locally).
No length prediction.
"""

from __future__ import annotations

from ecoserve.coordinator.policy import BasePolicy, Decisions, DispatchPrefill, SchedulerState, StartTransfer, WorkerView


class DistServePolicy(BasePolicy):
    name = "distserve"
    needs_roles: tuple[frozenset[str], ...] = (frozenset({"prefill", "decode"}), frozenset({"mixed"}))

    def __init__(self, queue_factor: float = 2.0, headroom: float = 0.05) -> None:
        if queue_factor <= 0:
            raise ValueError(f"queue_factor must be > 0, got {queue_factor}")
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        self.queue_factor = queue_factor
        self.headroom = headroom

    def schedule(self, state: SchedulerState) -> Decisions:
        out = Decisions()
        self._dispatch_prompts(state, out)
        self._pull_kv(state, out)
        return out

    def _dispatch_prompts(self, state: SchedulerState, out: Decisions) -> None:
        targets = state.alive("prefill") if state.alive("decode") else []
        targets += state.alive("mixed")
        if not targets:
            return
        queued = {w.rank: w.queued_prefill_tokens for w in targets}
        avail = {w.rank: w.available_blocks for w in targets}
        for req in state.waiting:
            fits = [w for w in targets if self._can_take(w, req.num_prefill_tokens, queued[w.rank], avail[w.rank])]
            if not fits:
                return  # FCFS: the head waits, so does everyone behind it
            w = min(fits, key=lambda v: (queued[v.rank] / v.token_budget, v.rank))
            out.prefills.append(DispatchPrefill(req.request_id, w.rank, decode_locally=w.role == "mixed"))
            queued[w.rank] += req.num_prefill_tokens
            avail[w.rank] -= w.blocks_for(req.num_prefill_tokens + (1 if w.role == "mixed" else 0))

    def _can_take(self, w: WorkerView, prompt: int, queued: int, avail: int) -> bool:
        need = w.blocks_for(prompt + (1 if w.role == "mixed" else 0))
        return avail >= need and (queued == 0 or queued + prompt <= self.queue_factor * w.token_budget)

    def _pull_kv(self, state: SchedulerState, out: Decisions) -> None:
        decoders = state.alive("decode")
        if not decoders:
            return
        avail = {w.rank: w.available_blocks for w in decoders}
        idle = {w.rank: w.num_running == 0 and w.committed_blocks == 0 for w in decoders}
        for req in state.kv_waiting:
            assert req.prefill_rank is not None
            best = max(decoders, key=lambda v: (avail[v.rank], -v.rank))
            need = best.blocks_for(req.num_prefill_tokens)
            reserve = int(self.headroom * best.num_blocks)
            if avail[best.rank] < need or (avail[best.rank] < need + reserve and not idle[best.rank]):
                return  # FCFS
            out.transfers.append(StartTransfer(req.request_id, req.prefill_rank, best.rank, need))
            avail[best.rank] -= need
            idle[best.rank] = False

"""Colocated baselines on `mixed` workers (DESIGN §4.2).

- `vllm`: FCFS over the whole cluster to the mixed worker with the fewest queued prompt tokens;
  the worker runs continuous batching, takes blocks on demand and preempts the latest arrival by
  recompute when it runs out. Two modes (`mode`), the schedule its mixed workers run:
  "chunked" (the default, vLLM's today): each step's decodes, then prompt chunks filling the
  token budget; "prefill-priority" (vLLM before chunked prefill, the baseline DistServe's and
  EcoServe's papers measured): while prompts wait, a step runs whole prompts up to the prefill
  token budget and no decodes; decodes run only when no waiting prompt fits.
- `orca`: as `vllm`, but a request is admitted only when its worker can hold prompt +
  `max_tokens` alongside everything already admitted there; the coordinator keeps that
  reservation until the request ends, so a worker never runs out and never preempts.
"""

from __future__ import annotations

from ecoserve.coordinator.policy import BasePolicy, Decisions, DispatchPrefill, SchedulerState, WorkerView


VLLM_MODES = ("chunked", "prefill-priority")


class VLLMPolicy(BasePolicy):
    name = "vllm"
    needs_roles: tuple[frozenset[str], ...] = (frozenset({"mixed"}),)
    reserve_max_tokens = False

    def __init__(self, queue_factor: float = 2.0, mode: str = "chunked") -> None:
        if queue_factor <= 0:
            raise ValueError(f"queue_factor must be > 0, got {queue_factor}")
        if mode not in VLLM_MODES:
            raise ValueError(f"unknown {self.name} mode {mode!r}; choose one of {', '.join(VLLM_MODES)}")
        self.queue_factor = queue_factor
        self.mixed_schedule = mode

    def schedule(self, state: SchedulerState) -> Decisions:
        out = Decisions()
        workers = state.alive("mixed")
        if not workers:
            return out
        queued = {w.rank: w.queued_prefill_tokens for w in workers}
        free = {w.rank: self._room(w) for w in workers}
        for req in state.waiting:
            need = self._need(req.num_prefill_tokens, req.max_tokens, workers[0])
            fits = [w for w in workers if free[w.rank] >= need and self._queue_ok(w, queued[w.rank], req.num_prefill_tokens)]
            if not fits:
                return out  # FCFS: the head waits, so does everyone behind it
            w = min(fits, key=lambda v: (queued[v.rank] / v.token_budget, v.rank))
            reserve = need if self.reserve_max_tokens else 0
            out.prefills.append(DispatchPrefill(req.request_id, w.rank, decode_locally=True, reserve_blocks=reserve))
            queued[w.rank] += req.num_prefill_tokens
            free[w.rank] -= need
        return out

    def _room(self, w: WorkerView) -> int:
        return w.available_blocks

    def _need(self, prompt: int, max_tokens: int, w: WorkerView) -> int:
        return w.blocks_for(prompt + 1)

    def _queue_ok(self, w: WorkerView, queued: int, prompt: int) -> bool:
        return queued == 0 or queued + prompt <= self.queue_factor * w.token_budget


class OrcaPolicy(VLLMPolicy):
    name = "orca"
    reserve_max_tokens = True

    def _room(self, w: WorkerView) -> int:
        return w.num_blocks - w.reserved_blocks

    def _need(self, prompt: int, max_tokens: int, w: WorkerView) -> int:
        return w.blocks_for(prompt + max_tokens)

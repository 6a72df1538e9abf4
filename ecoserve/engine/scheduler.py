"""The offline engine's local batcher: FCFS continuous batching with chunked prefill.

Each step: every running sequence that is decoding gets one token; the remaining token budget
goes to prefill chunks, oldest request first. When the KV pool runs dry the most recently
arrived running sequence is preempted by recompute (its blocks freed, its progress reset).

With `prefill_priority` (vllm's prefill-priority mode) a step that can run prompt work runs
only that: unfinished prompts of running sequences, then whole waiting prompts, FCFS, up to
the budget (a prompt longer than the budget starts alone and goes on in budget-sized chunks),
and no decodes. Decodes run only in steps where no prompt work fits.

With `slo_profile` (the "slo" schedule, EcoServe's iteration, DESIGN §4.1) every step first
takes every running decode, oldest first, then prompt work (unfinished prompts and recomputes
of the running, then waiting prompts, FCFS, whole or in chunks) up to the budget the latency
profile gives for the smallest `tpot_target_ms` among this step's decodes (engine/prompt_budget.py):
the step is predicted to keep that target while prompts wait. Prompt work never preempts a
sequence already scheduled in the step.

Two controls belong to the coordinator rather than to this batcher:

- Reservations. A sequence with `reserved_tokens` set never holds more than
  `pool.blocks_for_tokens(reserved_tokens)` blocks, i.e. KV for at most `cap` =
  that many blocks * block_size tokens. A chunk is cut short at `cap`; a sequence with no
  room left at all is *held*: it gets nothing this step, keeps its blocks, and its request id
  is listed in `held` (rebuilt by every `schedule()`) until its reservation is raised. Since
  sampling needs no KV for the sampled token, a decoding sequence is held once it has
  `num_computed_tokens == cap` and `num_tokens == cap + 1`. A held sequence never preempts
  others to grow (it does not try to grow), though it may still be the victim when an older
  sequence needs blocks.
- Parking. `park` takes a sequence out of scheduling altogether (status PARKED) and frees its
  device blocks; `unpark` puts it back. The engine saves or drops its KV around these calls
  (LLMEngine.preempt / resume).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ecoserve.engine.prompt_budget import PromptBudget
from ecoserve.engine.sequence import Sequence, SequenceStatus
from ecoserve.kv_cache import BlockPool
from ecoserve.latency.profile import LatencyProfile


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    prefills: list[ScheduledChunk]  # chunks of more than one token or an unfinished prompt
    decodes: list[ScheduledChunk]  # exactly one token each
    preempted: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class FCFSScheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_priority: bool = False, slo_profile: LatencyProfile | None = None) -> None:
        if prefill_priority and slo_profile is not None:
            raise ValueError("a scheduler runs one schedule: prefill_priority or slo_profile, not both")
        self.pool = pool
        self.prefill_priority = prefill_priority
        self.slo_profile = slo_profile
        self.last_budget: PromptBudget | None = None  # the "slo" schedule's last step's budget
        self.preempted_log: list[Sequence] = []  # every preemption, for the worker to report
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order
        self.parked: dict[str, Sequence] = {}  # by request id; neither running nor waiting
        self.held: list[str] = []  # request ids held back by their reservation in the last schedule()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that arrives with its KV already in its blocks (a decode worker's request
        after transfer). It keeps FCFS order by `arrival_index` among the running."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.running.sort(key=lambda s: s.arrival_index)

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling a running sequence but keep its blocks (a prefill worker's finished
        prompt whose KV waits to be sent)."""
        self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Remove a waiting, running or parked sequence and free its device blocks (host swap
        blocks are the engine's: use LLMEngine.release for a sequence that may hold some)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.parked.pop(seq.request_id, None)
        seq.block_table.release(self.pool)
        seq.status = SequenceStatus.FINISHED

    def park(self, seq: Sequence) -> None:
        """Stop scheduling a running or waiting sequence and free its device blocks (status
        PARKED). The caller first saves whatever KV it means to keep, and sets
        `num_computed_tokens` to match what `unpark` will find."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            raise ValueError(
                f"request {seq.request_id!r} is {seq.status.value} and not queued here; only a running "
                "or waiting sequence can be parked"
            )
        seq.block_table.release(self.pool)
        seq.status = SequenceStatus.PARKED
        self.parked[seq.request_id] = seq

    def unpark(self, seq: Sequence) -> None:
        """Schedule a parked sequence again. With nothing computed it goes to the front of the
        waiting queue and re-prefills prompt + outputs; with its computed KV back in its blocks
        (swapped in) it rejoins the running in arrival order."""
        if self.parked.get(seq.request_id) is not seq:
            raise ValueError(
                f"request {seq.request_id!r} is {seq.status.value}, not parked; only a parked sequence "
                "can be unparked"
            )
        if seq.num_computed_tokens == 0:
            del self.parked[seq.request_id]
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        elif seq.block_table.capacity >= seq.num_computed_tokens:
            del self.parked[seq.request_id]
            self.add_running(seq)
        else:
            raise ValueError(
                f"request {seq.request_id!r} has {seq.num_computed_tokens} computed tokens but blocks for only "
                f"{seq.block_table.capacity}; swap its KV in first, or reset num_computed_tokens to recompute"
            )

    def set_reservation(self, seq: Sequence, tokens: int | None) -> None:
        """Cap `seq`'s device KV at `pool.blocks_for_tokens(tokens)` blocks; None lifts the cap.

        The reservation must cover every token the sequence already has (prompt + outputs), so
        that the step it is waiting for fits; a smaller one is refused and changes nothing.
        """
        if seq.status is SequenceStatus.FINISHED:
            raise ValueError(f"request {seq.request_id!r} is finished; there is nothing to reserve for")
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int):
                raise ValueError(
                    f"a reservation is a number of tokens (int) or None for no limit, got {tokens!r}"
                )
            if tokens < seq.num_tokens:
                raise ValueError(
                    f"reservation of {tokens} tokens for request {seq.request_id!r} is below the {seq.num_tokens} "
                    f"tokens it already has ({len(seq.prompt_token_ids)} prompt + {len(seq.output_token_ids)} "
                    f"generated); reserve at least {seq.num_tokens}, or None for no limit"
                )
        seq.reserved_tokens = tokens

    def has_unfinished(self) -> bool:
        """Whether any sequence is queued for steps (parked ones are not, until unparked)."""
        return bool(self.waiting or self.running)

    def _room(self, seq: Sequence) -> int:
        """Tokens `seq` may still compute: its uncomputed ones, capped by its reservation."""
        if seq.reserved_tokens is None:
            return seq.num_uncomputed
        cap = self.pool.blocks_for_tokens(seq.reserved_tokens) * self.pool.block_size
        return max(0, min(seq.num_uncomputed, cap - seq.num_computed_tokens))

    def schedule(self) -> SchedulerOutput:
        if self.prefill_priority and (self.waiting or any(not _decoding(s) for s in self.running)):
            out = self._prompts_first()
            if out is not None:
                return out
        if self.slo_profile is not None:
            return self._slo_step(self.slo_profile)
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        self.held = []
        # 1. Running sequences, oldest first: decodes and unfinished prefill chunks.
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted by an older sequence this step
            room = self._room(seq)
            if room == 0:
                self.held.append(seq.request_id)  # at its reservation: wait for a raise
                continue
            if budget == 0:
                continue
            n = min(room, budget)
            if not self._reserve(seq, n, preempted):
                continue
            budget -= n
            chunk = ScheduledChunk(seq, n)
            # A decode is the one last token; a 1-token chunk of a longer recompute is a prefill.
            is_decode = n == 1 and seq.num_uncomputed == 1 and seq.output_token_ids
            (decodes if is_decode else prefills).append(chunk)
        # 2. Waiting sequences, FCFS, while budget, slots and blocks last. No preemption for these.
        # (Prefill-priority admits whole prompts only, in `_prompts_first`: none fitted.)
        while not self.prefill_priority and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(self._room(seq), budget)
            if n == 0:  # a reservation below what it must recompute: only a direct edit does this
                self.held.append(seq.request_id)
                break
            if seq.block_table.blocks_needed(seq.num_computed_tokens + n) > self.pool.num_free:
                break
            prefills.append(self._start(seq, n))
            budget -= n
        return SchedulerOutput(prefills, decodes, preempted)

    def _slo_step(self, profile: LatencyProfile) -> SchedulerOutput:
        """EcoServe's iteration: every decode, then prompt work up to the SLO-derived budget."""
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        scheduled: set[Sequence] = set()
        self.held = []
        # 1. Every running decode, oldest first (one token each, within the step's token limit).
        for seq in list(self.running):
            if seq not in self.running or not _decoding(seq):
                continue
            if self._room(seq) == 0:
                self.held.append(seq.request_id)
            elif len(decodes) < self.max_num_batched_tokens and self._reserve(seq, 1, preempted, scheduled):
                decodes.append(ScheduledChunk(seq, 1))
                scheduled.add(seq)
        budget = PromptBudget(profile, [c.seq for c in decodes], self.max_num_batched_tokens - len(decodes))
        self.last_budget = budget
        # 2. Unfinished prompts and recomputes of the running, oldest first.
        for seq in list(self.running):
            if seq not in self.running or seq in scheduled or _decoding(seq):
                continue
            room = self._room(seq)
            if room == 0:
                self.held.append(seq.request_id)
                continue
            n = budget.take(seq.num_computed_tokens, room)
            if n > 0 and self._reserve(seq, n, preempted, scheduled):
                budget.spend(seq.num_computed_tokens, n)
                prefills.append(ScheduledChunk(seq, n))
                scheduled.add(seq)
        # 3. Waiting prompts, FCFS, while budget, slots and blocks last; no preemption for these.
        while self.waiting and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            room = self._room(seq)
            n = budget.take(seq.num_computed_tokens, room)
            if room == 0:
                self.held.append(seq.request_id)
            if n == 0 or seq.block_table.blocks_needed(seq.num_computed_tokens + n) > self.pool.num_free:
                break
            budget.spend(seq.num_computed_tokens, n)
            prefills.append(self._start(seq, n))
        return SchedulerOutput(prefills, decodes, preempted)

    def _start(self, seq: Sequence, n: int) -> ScheduledChunk:
        """The queue head `seq` starts running with `n` tokens of its prompt this step."""
        seq.block_table.ensure_capacity(seq.num_computed_tokens + n, self.pool)
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, n)

    def _prompts_first(self) -> SchedulerOutput | None:
        """Prefill-priority's step: prompt work only, or None when none fits (decodes run then)."""
        budget = self.max_num_batched_tokens
        prefills: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        self.held = []
        for seq in list(self.running):  # unfinished prompts (and recomputes) first; decodes wait
            if seq not in self.running:
                continue
            room = self._room(seq)
            if room == 0:
                self.held.append(seq.request_id)
                continue
            if _decoding(seq) or budget == 0:
                continue
            n = min(room, budget)
            if self._reserve(seq, n, preempted):
                budget -= n
                prefills.append(ScheduledChunk(seq, n))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            room = self._room(seq)
            if room == 0 or (prefills and room > budget):  # whole prompts; a longer one starts alone
                break
            n = min(room, budget)
            if seq.block_table.blocks_needed(seq.num_computed_tokens + n) > self.pool.num_free:
                break
            prefills.append(self._start(seq, n))
            budget -= n
        if not prefills:
            return None  # (victims of a failed _reserve are in preempted_log and back in waiting)
        return SchedulerOutput(prefills, [], preempted)

    def _reserve(self, seq: Sequence, n: int, preempted: list[Sequence], scheduled: AbstractSet[Sequence] = frozenset()) -> bool:
        """Blocks for `n` more tokens of `seq`, preempting the newest others (never one in
        `scheduled`, already in this step; `seq` is not) if needed."""
        target = seq.num_computed_tokens + n
        while seq.block_table.blocks_needed(target) > self.pool.num_free:
            victim = next(s for s in reversed(self.running) if s not in scheduled)  # `seq` at the latest
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table.ensure_capacity(target, self.pool)
        return True

    def _preempt(self, seq: Sequence) -> None:
        # Recompute: drop the KV; the sequence re-prefills prompt + generated tokens later.
        self.running.remove(seq)
        seq.block_table.release(self.pool)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.preempted_log.append(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.block_table.release(self.pool)
        seq.status = SequenceStatus.FINISHED


def _decoding(seq: Sequence) -> bool:
    """Whether its next step is one decode token (its prompt and any recompute are done)."""
    return seq.num_uncomputed == 1 and bool(seq.output_token_ids)

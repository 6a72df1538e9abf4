"""The offline engine's local batcher: FCFS continuous batching with chunked prefill.

Each step: every running sequence that is decoding gets one token; the remaining token budget
goes to prefill chunks, oldest request first. When the KV pool runs dry the most recently
arrived running sequence is preempted by recompute (its blocks freed, its progress reset).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ecoserve.engine.sequence import Sequence, SequenceStatus
from ecoserve.kv_cache import BlockPool


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
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.preempted_log: list[Sequence] = []  # every preemption, for the worker to report
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order

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
        """Remove a waiting or running sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.block_table.release(self.pool)
        seq.status = SequenceStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        # 1. Running sequences, oldest first: decodes and unfinished prefill chunks.
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted by an older sequence this step
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, n, preempted):
                continue
            budget -= n
            chunk = ScheduledChunk(seq, n)
            (decodes if n == 1 and seq.output_token_ids else prefills).append(chunk)
        # 2. Waiting sequences, FCFS, while budget, slots and blocks last. No preemption for these.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if seq.block_table.blocks_needed(seq.num_computed_tokens + n) > self.pool.num_free:
                break
            seq.block_table.ensure_capacity(seq.num_computed_tokens + n, self.pool)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= n
            prefills.append(ScheduledChunk(seq, n))
        return SchedulerOutput(prefills, decodes, preempted)

    def _reserve(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Blocks for `n` more tokens of `seq`, preempting the newest others if needed."""
        target = seq.num_computed_tokens + n
        while seq.block_table.blocks_needed(target) > self.pool.num_free:
            victim = self.running[-1]
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

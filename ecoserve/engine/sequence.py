"""A request inside the offline engine: its tokens, progress and KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ecoserve.params import SamplingParams
from ecoserve.kv_cache import BlockTable


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    # Preempted by order of the coordinator (LLMEngine.preempt): holds no device blocks, is in
    # neither the running nor the waiting queue, and waits for LLMEngine.resume.
    PARKED = "parked"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # EOS or a stop token


@dataclass(eq=False)
class Sequence:
    """Progress is counted in tokens: `num_computed_tokens` of `num_tokens` have KV in the cache.

    A sequence is an entity: equal only to itself (`eq=False`). Field-by-field equality made
    every `seq in scheduler.running` compare whole prompts, O(batch²) per step: a sim-engine
    decode step (engine/sim.py) took 10 ms of CPU at batch 256 with it, 2.8 ms without.

    `reserved_tokens` caps the device KV the sequence may hold at
    `blocks_for_tokens(reserved_tokens)` blocks (None: no cap); the scheduler holds it back
    rather than grow past that (FCFSScheduler.held). While it is parked with `preempt_mode`
    "swap", its computed KV waits in the host swap space blocks `host_blocks`, in order.
    `tpot_target_ms` is the step time a worker running the "slo" schedule keeps each step within
    while this sequence decodes there (its coordinator's RunPrefill/ReceiveKV.tpot_target_ms;
    None: it sets no limit).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int  # FCFS order
    block_table: BlockTable
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    reserved_tokens: int | None = None
    host_blocks: list[int] = field(default_factory=list)
    preempt_mode: str | None = None  # "swap" or "recompute" while PARKED, else None
    tpot_target_ms: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

"""A request inside the offline engine: its tokens, progress and KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


from ecoserve.engine.sampling_params import SamplingParams
from ecoserve.kv_cache import BlockTable


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # EOS or a stop token


@dataclass
class Sequence:
    """Progress is counted in tokens: `num_computed_tokens` of `num_tokens` have KV in the cache."""

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

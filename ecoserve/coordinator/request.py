"""A request as the coordinator tracks it, and its lifecycle (DESIGN §3; docs/structure.md).

Every status change is a timestamped event, so TTFT splits into queueing, prefill, transfer
and first decode step. Plain data only: the policies read these objects directly, so a request
holds what its client sent and what the coordinator saw, never its true output length (only
oracle predictors are given that: `Lifecycle.true_length`).

The retry path (`Request.retry`) is the one way back to `WAITING_PREFILL`: a request whose
worker was lost, or whose KV transfer failed, before it ended. It keeps the tokens already
streamed; its next prefill recomputes the prompt and those tokens (`num_replayed`), so the
client sees the count go on with no duplicate and no gap.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ecoserve.params import SLO, SamplingParams


class RequestStatus(enum.Enum):
    WAITING_PREFILL = "waiting_prefill"  # admitted, in the PT queue
    PREFILLING = "prefilling"  # dispatched to a prefill (or mixed) worker
    TRANSFERRING = "transferring"  # first token out; KV waits on the prefill worker or moves P -> D
    DECODING = "decoding"  # in a decode batch; tokens stream to the client
    PREEMPTED = "preempted"  # KV dropped on its decode worker; waits to recompute there
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)


# Allowed transitions; anything else is a coordinator bug and raises.
_NEXT: dict[RequestStatus, set[RequestStatus]] = {
    RequestStatus.WAITING_PREFILL: {RequestStatus.PREFILLING},
    RequestStatus.PREFILLING: {RequestStatus.TRANSFERRING, RequestStatus.DECODING, RequestStatus.FINISHED},
    RequestStatus.TRANSFERRING: {RequestStatus.DECODING},
    RequestStatus.DECODING: {RequestStatus.PREEMPTED, RequestStatus.FINISHED},
    RequestStatus.PREEMPTED: {RequestStatus.DECODING, RequestStatus.FINISHED},
}
_TERMINAL = {RequestStatus.ABORTED, RequestStatus.FAILED}  # reachable from any live status
# Back to WAITING_PREFILL, through `Request.retry` only: the work was lost before the request ended.
_RETRY_FROM = {
    RequestStatus.PREFILLING, RequestStatus.TRANSFERRING, RequestStatus.DECODING, RequestStatus.PREEMPTED,
}


@dataclass(frozen=True)
class LifecycleEvent:
    status: RequestStatus
    time: float  # time.monotonic()


@dataclass(kw_only=True)
class Request:
    """One accepted request. `request_id` is the coordinator's (unique across clients)."""

    request_id: str
    client: bytes  # the client's ZeroMQ routing id
    client_request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # as the client sent it; the workers sample with it
    stream: bool
    slo: SLO | None = None  # None: no latency targets
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING_PREFILL
    events: list[LifecycleEvent] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    prefill_rank: int | None = None
    decode_rank: int | None = None
    num_preemptions: int = 0
    reserved_blocks: int = 0  # held on prefill_rank until the request ends (orca's reservation)
    # Length prediction (policies that predict): what the predictor said, and the bucket bound /
    # reservation horizon in output tokens (raised by extensions).
    raw_prediction: int | None = None
    predicted_tokens: int | None = None
    decode_start_step: int | None = None  # its decode worker's step when it (re)started decoding
    preempt_mode: str | None = None  # while preempted by order of the coordinator: "swap" | "recompute"
    resuming: bool = False  # a Resume was sent; the next token restarts it
    text_sent: str = ""  # text already streamed (incremental detokenisation)
    dispatch_latency_s: float | None = None  # front door -> dispatch decision
    # Retries (worker lost, KV transfer failed): how many so far, and why each happened.
    num_retries: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    # Output tokens the next prefill recomputes after the prompt (set by a retry): the KV a
    # prefill of this request produces covers prompt + these, and sampling goes on after them.
    num_replayed: int = 0

    def __post_init__(self) -> None:
        self.events.append(LifecycleEvent(self.status, self.arrival))

    # Read-only views of the fields policies and the simulator read most (one copy: `params`, `slo`).
    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def ignore_eos(self) -> bool:
        return self.params.ignore_eos

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self.params.stop_token_ids

    @property
    def slo_ttft_ms(self) -> float | None:
        return None if self.slo is None else self.slo.ttft_ms

    @property
    def slo_tpot_ms(self) -> float | None:
        return None if self.slo is None else self.slo.tpot_ms

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens a prefill of it computes, and its KV once prefilled: the prompt, plus the
        outputs a retry replays."""
        return len(self.prompt_token_ids) + self.num_replayed

    @property
    def ttft_deadline(self) -> float:
        """When its first token is due (its arrival when it has no TTFT SLO)."""
        return self.arrival + (self.slo_ttft_ms or 0.0) / 1e3

    def transition(self, status: RequestStatus, now: float | None = None) -> None:
        if status not in _NEXT.get(self.status, set()) and not (status in _TERMINAL and not self.status.terminal):
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.status.name} -> {status.name}")
        self.status = status
        self.events.append(LifecycleEvent(status, time.monotonic() if now is None else now))

    def retry(self, now: float, reason: str) -> None:
        """Back to WAITING_PREFILL after its work was lost (the caller has released what any
        worker held for it): placement cleared, the tokens produced so far kept to replay."""
        if self.status not in _RETRY_FROM:
            raise RuntimeError(f"request {self.request_id}: cannot retry from {self.status.name}")
        self.status = RequestStatus.WAITING_PREFILL
        self.events.append(LifecycleEvent(self.status, now))
        self.num_retries += 1
        self.retry_reasons.append(reason)
        self.num_replayed = len(self.output_token_ids)
        self.prefill_rank = self.decode_rank = None
        self.decode_start_step = None
        self.preempt_mode = None
        self.resuming = False

    def first_time(self, status: RequestStatus) -> float | None:
        return next((e.time for e in self.events if e.status is status), None)

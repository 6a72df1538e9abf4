"""The policy interface: `schedule(state) -> Decisions`, a pure function of plain data.

The coordinator builds a `SchedulerState` view, calls the policy, then applies the decisions
(sends the messages, moves the requests between queues). Policies never touch sockets, and
the simulator calls the same objects.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from ecoserve.coordinator.ledger import ReservationLedger
from ecoserve.coordinator.request import Request
from ecoserve.predictor.predictors import Predictor


@dataclass
class WorkerView:
    """What the coordinator knows about one worker rank."""

    rank: int
    role: str  # "prefill" | "decode" | "mixed"
    num_blocks: int
    block_size: int
    token_budget: int  # max tokens per step (the worker's chunked-prefill budget)
    free_blocks: int  # as last reported by the worker
    committed_blocks: int = 0  # promised by decisions the worker has not reported back on yet
    reserved_blocks: int = 0  # held for admitted requests' whole lifetime (reserving policies)
    queued_prefill_tokens: int = 0  # prompt tokens dispatched to it and not yet prefilled
    num_running: int = 0
    alive: bool = True
    decode_steps: int = 0  # decode steps it has reported (the reservation timeline's clock)
    kv_bytes_per_token: int = 0  # K and V over all layers (0: unknown)

    @property
    def available_blocks(self) -> int:
        return self.free_blocks - self.committed_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefill_blocks(self, num_prefill_tokens: int) -> int:
        """Blocks a prefill of that many tokens holds here until it reports back."""
        # A mixed worker also writes the first decode token's KV before it reports again.
        return self.blocks_for(num_prefill_tokens + (1 if self.role == "mixed" else 0))


class FIFOQueue:
    """The PT queue in arrival order, with O(1) removal (a dict keeps insertion order)."""

    def __init__(self) -> None:
        self._items: dict[str, Request] = {}

    def push(self, req: Request) -> None:
        self._items[req.request_id] = req

    def remove(self, request_id: str) -> bool:
        return self._items.pop(request_id, None) is not None

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items.values())  # callers never change the queue while iterating

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, req: object) -> bool:
        return isinstance(req, Request) and req.request_id in self._items

    def lengths(self) -> dict[str, int]:
        return {}


@dataclass
class SchedulerState:
    now: float
    waiting: FIFOQueue  # the PT queue (the policy's own kind: FIFO, or one queue per RL bucket)
    kv_waiting: deque[Request]  # prompt done, KV held on its prefill worker, not moving yet
    workers: dict[int, WorkerView]
    ledger: ReservationLedger = field(default_factory=ReservationLedger)  # decode-side reservations
    near_limit: dict[str, Request] = field(default_factory=dict)  # decoding, close to its reservation
    preempted: dict[str, Request] = field(default_factory=dict)  # preempted by order, waiting to resume
    requests: dict[str, Request] = field(default_factory=dict)  # every live request by id

    def alive(self, role: str) -> list[WorkerView]:
        return [w for w in self.workers.values() if w.alive and w.role == role]


@dataclass(frozen=True)
class DispatchPrefill:
    request_id: str
    rank: int
    decode_locally: bool  # a mixed worker keeps the request through decode
    reserve_blocks: int = 0  # blocks the coordinator keeps for the request until it ends
    tpot_target_ms: float | None = None  # the step time its decode worker keeps to ("slo" schedule)


@dataclass(frozen=True)
class StartTransfer:
    request_id: str
    src_rank: int
    dst_rank: int
    num_blocks: int  # blocks the destination allocates for the prompt's KV
    tpot_target_ms: float | None = None  # as DispatchPrefill's


@dataclass(frozen=True)
class Reserve:
    """Reserve on decode worker `rank`: each member (request id, KV tokens at its start) may then
    produce `horizon` tokens. Applied before the prefills and transfers of the same round."""

    rank: int
    horizon: int
    members: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Extend:
    """Raise a decoding request's reservation to `horizon` output tokens in total."""

    request_id: str
    horizon: int


@dataclass(frozen=True)
class PreemptDecode:
    request_id: str
    mode: str  # "swap" | "recompute"


@dataclass(frozen=True)
class ResumeDecode:
    """Bring a preempted request back on its decode worker; it may produce `horizon` more tokens."""

    request_id: str
    horizon: int


@dataclass
class Decisions:
    reservations: list[Reserve] = field(default_factory=list)
    prefills: list[DispatchPrefill] = field(default_factory=list)  # in the order to dispatch
    transfers: list[StartTransfer] = field(default_factory=list)
    preemptions: list[PreemptDecode] = field(default_factory=list)  # applied before extensions
    extensions: list[Extend] = field(default_factory=list)
    resumes: list[ResumeDecode] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.reservations or self.prefills or self.transfers or self.preemptions or self.extensions or self.resumes
        )


class Policy(Protocol):
    name: str
    # Worker roles a cluster needs for this policy: any one of these sets must be present.
    needs_roles: tuple[frozenset[str], ...]
    # Tokens before a request exhausts its reservation at which the coordinator asks to extend it
    # (0: the policy makes no reservations to extend).
    extend_ahead: int
    # Decode steps a reserved cohort may take to start (the reservation ledger's first horizon;
    # widened as observed). Read only where the policy makes reservations.
    start_delay: int
    # Its length predictor (None: it predicts nothing). The lifecycle binds true lengths to it
    # when it is an oracle; the policy itself never sees one.
    predictor: Predictor | None
    # The schedule its mixed workers run: "chunked" (prompt chunks fill each step's token budget
    # beside the decodes) or "prefill-priority" (while prompts wait, whole prompts and no decodes).
    mixed_schedule: str

    def new_queue(self) -> FIFOQueue: ...

    def on_admit(self, req: Request) -> None: ...

    def on_finish(self, req: Request) -> None: ...

    def schedule(self, state: SchedulerState) -> Decisions: ...


class BasePolicy:
    """Defaults for policies without length prediction: one FIFO PT queue, nothing to learn."""

    name = ""
    needs_roles: tuple[frozenset[str], ...] = ()
    extend_ahead = 0
    start_delay = 32
    predictor: Predictor | None = None
    mixed_schedule = "chunked"

    def new_queue(self) -> FIFOQueue:
        return FIFOQueue()

    def on_admit(self, req: Request) -> None:
        return None

    def on_finish(self, req: Request) -> None:
        return None


def check_cluster(policy: Policy, roles: set[str]) -> None:
    """Refuse, before anything starts, a cluster this policy cannot schedule."""
    if not any(need <= roles for need in policy.needs_roles):
        options = " or ".join("+".join(sorted(n)) for n in policy.needs_roles)
        raise ValueError(
            f"policy {policy.name!r} needs {options} workers; this cluster has {sorted(roles) or 'none'}"
            + (" (start it with --mixed K)" if frozenset({"mixed"}) in policy.needs_roles else "")
        )


def layout_kinds(policy: Policy) -> list[frozenset[str]]:
    """The role sets a simulated or searched layout of this policy may have: exactly one of
    `needs_roles` (an instance of another role would be idle GPUs under a misleading label)."""
    return list(policy.needs_roles)


def check_layout(policy: Policy, counts: dict[str, int]) -> None:
    """Refuse a layout (instances per role) whose roles are not exactly one of the policy's kinds,
    naming the kinds it accepts and the flags that ask for them."""
    roles = frozenset(r for r, n in counts.items() if n > 0)
    if roles in layout_kinds(policy):
        return
    asked = ", ".join(f"{n} {r}" for r, n in counts.items() if n > 0) or "no instances"
    raise ValueError(f"policy {policy.name!r} cannot run a layout of {asked} instances; it accepts {describe_kinds(policy)}")


def describe_kinds(policy: Policy) -> str:
    """`prefill+decode instances (--prefill N --decode N) or mixed instances (--mixed N)`."""
    order = ("prefill", "decode", "mixed")
    parts = []
    for kind in layout_kinds(policy):
        roles = sorted(kind, key=order.index)
        parts.append(f"{'+'.join(roles)} instances ({' '.join(f'--{r} N' for r in roles)})")
    return " or ".join(parts)

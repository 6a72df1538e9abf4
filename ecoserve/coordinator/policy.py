"""The policy interface: `schedule(state) -> Decisions`, a pure function of plain data.

The coordinator builds a `SchedulerState` view, calls the policy, then applies the decisions
(sends the messages, moves the requests between queues). Policies never touch sockets, and
the simulator calls the same objects.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ecoserve.coordinator.request import Request


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

    @property
    def available_blocks(self) -> int:
        return self.free_blocks - self.committed_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass
class SchedulerState:
    now: float
    waiting: deque[Request]  # the PT queue, in arrival order
    kv_waiting: deque[Request]  # prompt done, KV held on its prefill worker, no decode worker yet
    workers: dict[int, WorkerView]

    def alive(self, role: str) -> list[WorkerView]:
        return [w for w in self.workers.values() if w.alive and w.role == role]


@dataclass(frozen=True)
class DispatchPrefill:
    request_id: str
    rank: int
    decode_locally: bool  # a mixed worker keeps the request through decode
    reserve_blocks: int = 0  # blocks the coordinator keeps for the request until it ends


@dataclass(frozen=True)
class StartTransfer:
    request_id: str
    src_rank: int
    dst_rank: int
    num_blocks: int  # blocks the destination allocates for the prompt's KV


@dataclass
class Decisions:
    prefills: list[DispatchPrefill] = field(default_factory=list)  # in the order to dispatch
    transfers: list[StartTransfer] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.transfers


class Policy(Protocol):
    name: str
    # Worker roles a cluster needs for this policy: any one of these sets must be present.
    needs_roles: tuple[frozenset[str], ...]

    def schedule(self, state: SchedulerState) -> Decisions: ...


def check_cluster(policy: Policy, roles: set[str]) -> None:
    """Refuse, before anything starts, a cluster this policy cannot schedule."""
    if not any(need <= roles for need in policy.needs_roles):
        options = " or ".join("+".join(sorted(n)) for n in policy.needs_roles)
        raise ValueError(
            f"policy {policy.name!r} needs {options} workers; this cluster has {sorted(roles) or 'none'}"
            + (" (start it with --mixed K)" if frozenset({"mixed"}) in policy.needs_roles else "")
        )

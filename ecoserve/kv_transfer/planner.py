"""Coordinator half of the KV transfer: number each (src, dst) pair's transfers and track them.

The planner never waits: ``plan`` returns at once, and both workers enforce the in-flight bound
themselves by posting in sequence order (see ``ecoserve.kv_transfer.engine``). The planner's
count of transfers in flight per pair is a placement hint (``has_room``), not a gate.
Torch-free.
"""

from __future__ import annotations

from collections import OrderedDict

from ecoserve.kv_transfer.types import TransferPlan

# How many finished request ids are remembered so that a second ``finish`` (the other side's
# terminal report) is a no-op rather than a KeyError.
_FINISHED_MEMORY = 65536


class TransferPlanner:
    """Assigns per-pair sequence numbers and counts the transfers in flight on each pair."""

    def __init__(self, max_in_flight_per_pair: int = 4) -> None:
        if isinstance(max_in_flight_per_pair, bool) or max_in_flight_per_pair < 1:
            raise ValueError(
                f"max_in_flight_per_pair must be an int >= 1, got {max_in_flight_per_pair!r}"
            )
        self.max_in_flight_per_pair = max_in_flight_per_pair
        self._next_seq: dict[tuple[int, int], int] = {}  # (src, dst) -> next seq_no
        self._pending: dict[str, TransferPlan] = {}  # request_id -> plan, in planning order
        self._in_flight: dict[tuple[int, int], int] = {}  # (src, dst) -> planned, not finished
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently finished ids

    def plan(self, request_id: str, src_rank: int, dst_rank: int, num_tokens: int) -> TransferPlan:
        """Plan moving ``num_tokens`` tokens of KV for ``request_id`` from src to dst.

        The plan takes the pair's next sequence number (0, 1, 2, ...); send it to both workers.
        A request may have one transfer pending at a time; plan again (e.g. a retry on another
        pair) only after ``finish``.
        """
        if request_id in self._pending:
            old = self._pending[request_id]
            raise ValueError(
                f"request {request_id!r} already has a pending transfer "
                f"({old.src_rank} -> {old.dst_rank}, seq_no {old.seq_no}); "
                "call finish() before planning it again"
            )
        pair = (src_rank, dst_rank)
        plan = TransferPlan(request_id, src_rank, dst_rank, self._next_seq.get(pair, 0), num_tokens)
        self._next_seq[pair] = plan.seq_no + 1
        self._pending[request_id] = plan
        self._in_flight[pair] = self._in_flight.get(pair, 0) + 1
        self._finished.pop(request_id, None)
        return plan

    def in_flight(self, src_rank: int, dst_rank: int) -> int:
        """Transfers planned on the pair and not finished yet."""
        return self._in_flight.get((src_rank, dst_rank), 0)

    def has_room(self, src_rank: int, dst_rank: int) -> bool:
        """Whether a new transfer on the pair would be posted at once rather than queue."""
        return self.in_flight(src_rank, dst_rank) < self.max_in_flight_per_pair

    def finish(self, request_id: str) -> None:
        """Record that the transfer ended (DONE, FAILED or TIMED_OUT reported by either side).

        Idempotent: the second side's report of the same transfer is a no-op.
        """
        plan = self._pending.pop(request_id, None)
        if plan is None:
            if request_id in self._finished:
                return
            raise KeyError(
                f"no transfer planned for request {request_id!r}; finish() takes the "
                "request_id of a plan returned by plan()"
            )
        pair = (plan.src_rank, plan.dst_rank)
        self._in_flight[pair] -= 1
        self._finished[request_id] = None
        if len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def pending(self) -> list[TransferPlan]:
        """Unfinished plans, oldest first."""
        return list(self._pending.values())

    def assert_no_leaks(self) -> None:
        """Fail when any planned transfer was never finished."""
        if self._pending:
            ids = ", ".join(repr(p.request_id) for p in self._pending.values())
            raise AssertionError(f"{len(self._pending)} transfers never finished: {ids}")


__all__ = ["TransferPlanner"]

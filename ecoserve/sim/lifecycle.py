"""The simulator's coordinator side: the live `Lifecycle`, with a decode step's news folded in.

Per-token `TokenEvents` are replaced by one `DecodeProgress` per simulated decode step that lists
only the requests something happened to; `SimLifecycle` folds it in through the same
`Reservations` calls as `Lifecycle` folds a step's tokens. A request's output "token list" is a
`TokenCount`: a live count, since the simulator produces no token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from ecoserve.coordinator.lifecycle import Lifecycle
from ecoserve.coordinator.request import Request, RequestStatus as S

if TYPE_CHECKING:
    from ecoserve.sim.worker import _Seq


class TokenCount:
    """A request's output "token list" in the simulator: only its length exists.

    `len()` is live: while the request sits on a decode worker it is that worker's count for it,
    so the policies' `len(req.output_token_ids)` reads what a live coordinator would have
    received by now. `append` (the first token, from `PrefillDone`) counts one more.
    """

    __slots__ = ("base", "seq")

    def __init__(self) -> None:
        self.base = 0
        self.seq: _Seq | None = None

    def __len__(self) -> int:
        seq = self.seq
        return self.base if seq is None else seq.now()

    def append(self, token: int) -> None:
        self.base += 1

    def __getitem__(self, index: Any) -> Any:
        n = len(self)
        return [0] * len(range(n)[index]) if isinstance(index, slice) else 0  # token ids are not simulated

    def __iter__(self) -> Any:
        return iter([0] * len(self))


@dataclass(frozen=True)
class DecodeProgress:
    """One decode step's news for the coordinator (the simulator's stand-in for TokenEvents)."""

    rank: int
    finished: list[tuple[str, str]]  # (request id, finish reason)
    resumed: list[str]  # produced their first token since coming back (preemption, recompute)
    preempted: list[str]  # dropped by the worker for room (recompute later)
    near_limit: list[str]  # reached `extend_ahead` tokens before their reservation


class SimLifecycle(Lifecycle):
    """`Lifecycle`, with a decode step's news folded in from `DecodeProgress`, and the trace's
    output lengths (`trace_lengths`, filled by the simulator) as the true lengths it gives
    oracle predictors: a simulated request ignores EOS up to its cap, yet the simulated worker
    ends it at its trace length, so the live rule (`ignore_eos` -> `max_tokens`) does not hold."""

    # request id -> its forced output length; the simulator sets its own table here
    trace_lengths: Mapping[str, int] = MappingProxyType({})

    def true_length(self, request_id: str) -> int | None:
        return self.trace_lengths.get(request_id)

    def on_worker_message(self, msg: Any) -> None:
        if not isinstance(msg, DecodeProgress):
            super().on_worker_message(msg)
            return
        view = self.registry.views[msg.rank]
        now = self.clock()
        reservations = self.reservations
        reservations.dropped_by_worker(msg.preempted)
        for rid in msg.resumed:
            req = self.requests.get(rid)
            if req is not None:
                reservations.produced(req, view)
        for rid in msg.near_limit:
            req = self.requests.get(rid)
            if req is not None:
                reservations.check_near_limit(req)
        for rid, reason in msg.finished:
            req = self.requests.get(rid)
            if req is not None and req.status in (S.DECODING, S.PREEMPTED):
                if req.status is S.PREEMPTED:
                    req.transition(S.DECODING, now)
                self.finish(req, reason)


# --- simulated workers ----------------------------------------------------------------------------


class NullCodec:
    """Token ids only: a simulated cluster has no text."""

    def decode(self, token_ids: list[int]) -> str:
        return ""

    def new_text(self, req: Request) -> str:
        return ""


def lifecycle_leaks(lc: Lifecycle) -> list[str]:
    """What an idle coordinator should no longer hold: live requests, pending releases,
    planned transfers, queued work, decode-side reservations."""
    problems = []
    if lc.requests or lc.releasing or lc.transfer_blocks or len(lc.waiting) or lc.kv_waiting:
        problems.append(f"coordinator still tracks {len(lc.requests)} requests, {len(lc.releasing)} releasing")
    try:
        lc.ledger.assert_empty()
    except AssertionError as exc:
        problems.append(str(exc))
    return problems

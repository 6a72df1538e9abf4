"""Decode-side reservations, for policies that reserve KV for a predicted length (`ecoserve`,
DESIGN §4.1): the ledger of cohorts and its start-delay horizons, the extensions, preemptions and
resumes a policy orders, and the news that moves a reserved request along (it is dropped by its
worker for room, comes back, nears the end of its reservation, starts decoding).

The live `Lifecycle` and the simulator's `SimLifecycle` both fold worker news in through this one
object. With a policy that reserves nothing (`extend_ahead` 0, no `Reserve` decisions) it only
counts the preemptions workers make on their own.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ecoserve import protocol as p
from ecoserve.coordinator.ledger import ReservationLedger
from ecoserve.coordinator.policy import Decisions, Policy, Reserve, WorkerView
from ecoserve.coordinator.request import Request, RequestStatus as S
from ecoserve.coordinator.workers import WorkerRegistry

log = logging.getLogger(__name__)

ToWorker = Callable[[int, Any], None]


class Reservations:
    """What reserving policies hold on decode workers, and the coordinator's side of moving it."""

    def __init__(
        self, policy: Policy, registry: WorkerRegistry, requests: dict[str, Request], to_worker: ToWorker,
        counters: dict[str, int], clock: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.registry = registry
        self.requests = requests  # the lifecycle's table of live requests (shared, not copied)
        self.to_worker = to_worker
        self.counters = counters  # the lifecycle's counters (shared)
        self.clock = clock
        self.ledger = ReservationLedger(policy.start_delay)  # decode-side reservations
        self.near_limit: dict[str, Request] = {}  # decoding, within extend_ahead of its reservation
        self.preempted: dict[str, Request] = {}  # preempted by our order, acknowledged, not resumed

    # --- decisions -----------------------------------------------------------------------------

    def reserve(self, reservations: list[Reserve]) -> None:
        """Enter a round's cohorts in the ledger; applied before its prefills and transfers."""
        views = self.registry.views
        for res in reservations:
            view = views[res.rank]
            self.ledger.add(res.rank, view.block_size, res.horizon, list(res.members), view.decode_steps)
            for rid, _ in res.members:
                self.requests[rid].decode_rank = res.rank

    def apply_orders(self, decisions: Decisions, now: float) -> None:
        """Preemptions, extensions and resumes on decode workers, in that order."""
        for pre in decisions.preemptions:
            req = self.requests[pre.request_id]
            assert req.decode_rank is not None
            self.ledger.remove(req.request_id)
            self.near_limit.pop(req.request_id, None)
            req.transition(S.PREEMPTED, now)
            req.preempt_mode = pre.mode  # until the worker says what it did
            req.num_preemptions += 1
            self.counters["preemptions"] += 1
            self.to_worker(req.decode_rank, p.Preempt(req.request_id, pre.mode))
        for ext in decisions.extensions:
            req = self.requests[ext.request_id]
            if req.request_id not in self.ledger.where:  # a policy bug; the request keeps its old cap
                log.error("policy %s extended %s, which holds no reservation (%s); ignored",
                          self.policy.name, req.request_id, req.status.name)
                continue
            assert req.decode_rank is not None and req.predicted_tokens is not None
            view = self.registry.views[req.decode_rank]
            cohort = self.ledger.where[req.request_id]
            started = req.decode_start_step if req.decode_start_step is not None else view.decode_steps
            self.ledger.rehome(req.request_id, cohort.horizon + ext.horizon - req.predicted_tokens, started)
            req.predicted_tokens = ext.horizon
            self.near_limit.pop(req.request_id, None)
            self.counters["extensions"] += 1
            tokens = self.ledger.reservation_tokens(req.request_id)
            assert tokens is not None
            self.to_worker(req.decode_rank, p.ExtendReservation(req.request_id, tokens))
        for res in decisions.resumes:
            req = self.preempted.pop(res.request_id)
            assert req.decode_rank is not None
            view = self.registry.views[req.decode_rank]
            produced = len(req.output_token_ids)
            kv = req.num_prompt_tokens + produced
            self.ledger.add(req.decode_rank, view.block_size, res.horizon - produced, [(req.request_id, kv)], view.decode_steps)
            req.predicted_tokens = res.horizon
            req.resuming = True
            self.to_worker(req.decode_rank, p.Resume(req.request_id, self.ledger.reservation_tokens(req.request_id)))

    # --- worker news ---------------------------------------------------------------------------

    def decoding_started(self, req: Request, step: int) -> None:
        """`req`'s KV is on its decode worker, which decodes it from its step `step`."""
        req.decode_start_step = step
        self.ledger.started(req.request_id, step)

    def dropped_by_worker(self, request_ids: list[str]) -> None:
        """The worker ran out of blocks and dropped these decoding requests (to recompute)."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None and req.status is S.DECODING:
                req.transition(S.PREEMPTED, self.clock())
                req.num_preemptions += 1
                self.counters["preemptions"] += 1
                self.counters["preemptions_local"] += 1

    def acknowledged(self, msg: p.Preempted) -> None:
        """The worker did what we ordered (swap or recompute): `req` waits here to resume."""
        req = self.requests.get(msg.request_id)
        if req is None or req.status is not S.PREEMPTED or req.resuming:
            return
        req.preempt_mode = msg.mode
        self.counters[f"preemptions_{msg.mode}"] += 1
        self.preempted[req.request_id] = req

    def produced(self, req: Request, view: WorkerView) -> None:
        """`req` produced a token on `view`'s last step: a preempted request is back (from a
        local recompute, or resumed by our order; its reservation runs from that step)."""
        if req.status is S.PREEMPTED and (req.preempt_mode is None or req.resuming):
            req.transition(S.DECODING, self.clock())
            if req.resuming:
                req.resuming, req.preempt_mode = False, None
                req.decode_start_step = view.decode_steps - 1
                self.ledger.started(req.request_id, view.decode_steps - 1)

    def check_near_limit(self, req: Request) -> None:
        """Queue `req` for an extension once it is within `extend_ahead` tokens of its reservation."""
        ahead = self.policy.extend_ahead
        if (
            ahead and req.predicted_tokens is not None and req.status is S.DECODING
            and len(req.output_token_ids) + ahead >= req.predicted_tokens and req.predicted_tokens < req.max_tokens
        ):
            self.near_limit[req.request_id] = req

    # --- endings -------------------------------------------------------------------------------

    def forget(self, req: Request) -> None:
        """Undo every reservation `req` holds: the decode-side ledger and queues, and the blocks its
        prefill worker keeps for it."""
        self.ledger.remove(req.request_id)
        self.near_limit.pop(req.request_id, None)
        self.preempted.pop(req.request_id, None)
        if req.reserved_blocks and req.prefill_rank is not None:
            self.registry.views[req.prefill_rank].reserved_blocks -= req.reserved_blocks
            req.reserved_blocks = 0

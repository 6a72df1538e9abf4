"""Request lifecycle on the coordinator: queues, policy decisions applied, worker events
folded in, terminal events sent. Exactly one terminal event per accepted request reaches its
client, and every block a worker held for it is confirmed released (`releasing` empties).

`Lifecycle` holds the tables and does admission, scheduling rounds and endings; it is composed
of rooms that share those tables: `Reservations` (reservations.py: decode-side reservations of
reserving policies), `WorkerEvents` (worker_events.py: worker news folded in) and `Recovery`
(recovery.py: lost workers, retries, releases; DESIGN §10). Its gauges are metrics.py's
`coordinator_stats`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Callable

from ecoserve import protocol as p
from ecoserve.config import CoordinatorConfig
from ecoserve.coordinator.frontend import TextCodec
from ecoserve.coordinator.metrics import Reservoir, coordinator_stats, request_timings
from ecoserve.coordinator.policy import Decisions, Policy, SchedulerState
from ecoserve.coordinator.request import Request, RequestStatus as S
from ecoserve.coordinator.recovery import Recovery
from ecoserve.coordinator.reservations import Reservations
from ecoserve.coordinator.worker_events import WorkerEvents
from ecoserve.coordinator.workers import WorkerRegistry
from ecoserve.kv_transfer.planner import TransferPlanner

ToClient = Callable[[bytes, Any], None]
ToWorker = Callable[[int, Any], None]


class Lifecycle:
    """One coordinator's requests from admission to their terminal event (module docstring)."""

    def __init__(
        self, policy: Policy, registry: WorkerRegistry, codec: TextCodec,
        to_client: ToClient, to_worker: ToWorker, config: CoordinatorConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # every lifecycle timestamp; the simulator passes its own clock
        self.policy = policy
        self.registry = registry
        self.codec = codec
        self.to_client = to_client
        self.to_worker = to_worker
        self.config = config
        self.planner = TransferPlanner(config.max_transfers_in_flight_per_pair)
        self.requests: dict[str, Request] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self.waiting = policy.new_queue()
        self.kv_waiting: deque[Request] = deque()
        self.transfer_blocks: dict[str, int] = {}  # planned transfers: blocks committed on the decode side
        self.releasing: dict[str, set[int]] = {}  # ended requests whose workers have not confirmed release
        self.dirty = asyncio.Event()
        self.counters = {
            "finished": 0, "aborted": 0, "failed": 0, "preemptions": 0, "workers_lost": 0,
            "preemptions_local": 0, "preemptions_swap": 0, "preemptions_recompute": 0, "extensions": 0,
            "predicted": 0, "under_predicted": 0, "over_predicted": 0, "retries": 0, "transfers_failed": 0, "transfers_done": 0,
            "clients_disconnected": 0, "clients_too_slow": 0, "requests_client_too_slow": 0,
        }
        # Decode-side reservations (reserving policies); its tables are shared here by name. It sends
        # and reads the time through this object, so a caller that swaps `to_worker` or `clock` later
        # (the fault tests do) swaps them for it too.
        self.reservations = Reservations(policy, registry, self.requests, self._send, self.counters, self._now)
        self.ledger = self.reservations.ledger
        self.near_limit = self.reservations.near_limit  # decoding, within extend_ahead of its reservation
        self.preempted = self.reservations.preempted  # preempted by our order, acknowledged, not resumed
        self.lost: dict[int, str] = {}  # lost rank -> why
        self.backoff: dict[str, tuple[float, Request]] = {}  # retried, queued again at that time
        self.prediction_abs_error = 0.0  # sum over finished predicted requests of |raw prediction - length|
        self.dispatch_ms = Reservoir()  # front door -> dispatch decision, per request
        self.schedule_us = Reservoir()  # one policy.schedule() call
        self.events = WorkerEvents(self)  # worker news folded in
        self.recovery = Recovery(self)  # lost workers, retries, releases
        # True lengths go to an oracle predictor and nowhere else: no Request or query holds one.
        if policy.predictor is not None and policy.predictor.oracle:
            policy.predictor.bind(self.true_length)

    def kick(self) -> None:
        self.dirty.set()

    def _send(self, rank: int, msg: Any) -> None:
        self.to_worker(rank, msg)

    def _now(self) -> float:
        return self.clock()

    # --- admission and scheduling ------------------------------------------------------------

    def has_client_request(self, client: bytes, client_request_id: str) -> bool:
        return (client, client_request_id) in self.by_client

    def true_length(self, request_id: str) -> int | None:
        """A request's output length when it is certain before it runs (None: it is not): one
        with `ignore_eos` and no stop tokens runs to its `max_tokens`, nothing can stop it early.
        Only oracle predictors are given this lookup; the simulator's `SimLifecycle` answers from
        its trace instead."""
        req = self.requests.get(request_id)
        if req is None or not req.ignore_eos or req.stop_token_ids:
            return None
        return req.max_tokens

    def admit(self, req: Request) -> None:
        """Accept a built request: the policy predicts its length (if it does), then it queues."""
        self.requests[req.request_id] = req  # first: an oracle predictor looks its length up by id
        try:
            self.policy.on_admit(req)
        except Exception:
            del self.requests[req.request_id]  # nothing was queued
            raise
        self.by_client[(req.client, req.client_request_id)] = req.request_id
        self.waiting.push(req)
        self.kick()

    def schedule(self) -> None:
        if self.backoff:
            self.recovery.requeue_due()
        state = SchedulerState(
            self.clock(), self.waiting, self.kv_waiting, self.registry.views, self.ledger, self.near_limit,
            self.preempted, self.requests,
        )
        t0 = time.perf_counter()
        decisions = self.policy.schedule(state)
        self.schedule_us.add((time.perf_counter() - t0) * 1e6)
        self.apply(decisions)

    def apply(self, decisions: Decisions) -> None:
        now = self.clock()
        self.reservations.reserve(decisions.reservations)
        for d in decisions.prefills:
            self.waiting.remove(d.request_id)
            req = self.requests[d.request_id]
            view = self.registry.views[d.rank]
            req.transition(S.PREFILLING, now)
            req.prefill_rank = d.rank
            if d.decode_locally:
                req.decode_rank = d.rank
            req.dispatch_latency_s = now - req.arrival
            self.dispatch_ms.add(req.dispatch_latency_s * 1e3)
            view.queued_prefill_tokens += req.num_prefill_tokens
            view.committed_blocks += view.prefill_blocks(req.num_prefill_tokens)
            view.reserved_blocks += d.reserve_blocks
            req.reserved_blocks = d.reserve_blocks
            self.to_worker(d.rank, p.RunPrefill(
                request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, params=req.params,
                decode_locally=d.decode_locally, generated_token_ids=self._replayed(req),
                reserve_tokens=self.ledger.reservation_tokens(req.request_id) if d.decode_locally else None,
                tpot_target_ms=d.tpot_target_ms,
            ))
        if decisions.transfers:
            chosen = {t.request_id for t in decisions.transfers}
            self.kv_waiting = deque(r for r in self.kv_waiting if r.request_id not in chosen)
        for t in decisions.transfers:
            req = self.requests[t.request_id]
            plan = self.planner.plan(req.request_id, t.src_rank, t.dst_rank, req.num_prefill_tokens)
            req.decode_rank = t.dst_rank
            self.registry.views[t.dst_rank].committed_blocks += t.num_blocks
            self.transfer_blocks[req.request_id] = t.num_blocks
            # One deadline for both sides, on the wall clock (the workers may share no other).
            deadline = self.config.transfer_deadline_s
            deadline_at = time.time() + deadline
            first = req.output_token_ids[req.num_replayed]
            self.to_worker(t.dst_rank, p.ReceiveKV(
                request_id=req.request_id, src_rank=t.src_rank, seq_no=plan.seq_no, deadline_s=deadline,
                deadline_at=deadline_at,
                prompt_token_ids=req.prompt_token_ids, first_token=first, params=req.params,
                reserve_tokens=self.ledger.reservation_tokens(req.request_id), generated_token_ids=self._replayed(req),
                tpot_target_ms=t.tpot_target_ms,
            ))
            self.to_worker(t.src_rank, p.SendKV(req.request_id, t.dst_rank, plan.seq_no, deadline, deadline_at))
        self.reservations.apply_orders(decisions, now)

    @staticmethod
    def _replayed(req: Request) -> list[int]:
        """The outputs a retried request's prefill recomputes after its prompt."""
        return list(req.output_token_ids[: req.num_replayed]) if req.num_replayed else []

    # --- worker events and faults (WorkerEvents, Recovery) --------------------------------------

    def on_worker_message(self, msg: Any) -> None:
        self.events.on_message(msg)

    def worker_lost(self, rank: int, reason: str) -> None:
        self.recovery.worker_lost(rank, reason)

    def retry(self, req: Request, reason: str, backoff_s: float = 0.0) -> None:
        self.recovery.retry(req, reason, backoff_s)

    def next_retry_in(self) -> float | None:
        return self.recovery.next_retry_in()

    def can_serve(self) -> bool:
        return self.recovery.can_serve()

    def cannot_serve_reason(self) -> str:
        return self.recovery.cannot_serve_reason()

    def stats(self) -> dict[str, float]:
        return coordinator_stats(self)

    # --- endings ---------------------------------------------------------------------------------

    def finish(self, req: Request, reason: str) -> None:
        req.transition(S.FINISHED, self.clock())
        self.counters["finished"] += 1
        if req.raw_prediction is not None:
            n = len(req.output_token_ids)
            self.counters["predicted"] += 1
            self.prediction_abs_error += abs(req.raw_prediction - n)
            self.counters["under_predicted" if req.raw_prediction < n else "over_predicted"] += req.raw_prediction != n
            self.policy.on_finish(req)
        self._end(req, reason)

    def abort_client_request(self, client: bytes, client_request_id: str) -> bool:
        rid = self.by_client.get((client, client_request_id))
        if rid is None:
            return False
        req = self.requests[rid]
        self.recovery.release_everywhere(req)
        req.transition(S.ABORTED, self.clock())
        self.counters["aborted"] += 1
        self._end(req, "abort")
        return True

    def abort_client_requests(self, client: bytes) -> int:
        """Abort every request of `client` (its connection closed); how many there were."""
        mine = [crid for c, crid in self.by_client if c == client]
        for crid in mine:
            self.abort_client_request(client, crid)
        return len(mine)

    def fail(self, req: Request, message: str) -> None:
        self.recovery.release_everywhere(req)
        req.transition(S.FAILED, self.clock())
        self.counters["failed"] += 1
        self._forget(req)
        self.to_client(req.client, p.ErrorReply(req.client_request_id, "failed", message))

    def fail_all(self, message: str) -> None:
        for req in list(self.requests.values()):
            self.fail(req, message)

    def _end(self, req: Request, reason: str) -> None:
        self._forget(req)
        self.to_client(req.client, p.RequestFinished(
            request_id=req.client_request_id, token_ids=req.output_token_ids,
            text=self.codec.decode(req.output_token_ids), finish_reason=reason,
            num_prompt_tokens=req.num_prompt_tokens, **request_timings(req),
        ))

    def _forget(self, req: Request) -> None:
        self.reservations.forget(req)
        self.backoff.pop(req.request_id, None)
        self.requests.pop(req.request_id, None)
        self.by_client.pop((req.client, req.client_request_id), None)

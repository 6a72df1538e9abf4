"""Request lifecycle on the coordinator: queues, policy decisions applied, worker events
folded in, terminal events sent. Exactly one terminal event per accepted request reaches its
client, and every block a worker held for it is confirmed released (`releasing` empties).

Faults (DESIGN §10). A lost worker (its process exited, or its heartbeats stopped) is fenced
(told to shut down; anything it says later is ignored), its peers are told to abandon their
KV transfers with it (`PeerLost`), and each request it held work for is retried; so is a
request whose KV transfer failed or missed its deadline. A retry releases everything any
worker held for the request, gives it a fresh worker-facing id (`retry<k>:<id>`, so a late
message about the old attempt cannot touch the new one) and queues it again; its next prefill
recomputes the prompt plus the tokens already streamed, and the stream goes on from there.
After `max_retries` retries the request fails with an error naming every loss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable

from ecoserve import protocol as p
from ecoserve.config import CoordinatorConfig
from ecoserve.coordinator.frontend import TextCodec
from ecoserve.coordinator.metrics import Reservoir
from ecoserve.coordinator.policy import Decisions, Policy, SchedulerState, WorkerView
from ecoserve.coordinator.request import Request, RequestStatus as S
from ecoserve.coordinator.reservations import Reservations
from ecoserve.coordinator.workers import WorkerRegistry
from ecoserve.kv_transfer.planner import TransferPlanner

log = logging.getLogger(__name__)

ToClient = Callable[[bytes, Any], None]
ToWorker = Callable[[int, Any], None]


class Lifecycle:
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
            "predicted": 0, "under_predicted": 0, "over_predicted": 0, "retries": 0, "transfers_failed": 0,
            "clients_disconnected": 0,
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

    def kick(self) -> None:
        self.dirty.set()

    def _send(self, rank: int, msg: Any) -> None:
        self.to_worker(rank, msg)

    def _now(self) -> float:
        return self.clock()

    # --- admission and scheduling ------------------------------------------------------------

    def has_client_request(self, client: bytes, client_request_id: str) -> bool:
        return (client, client_request_id) in self.by_client

    def admit(self, req: Request) -> None:
        """Accept a built request: the policy predicts its length (if it does), then it queues."""
        if req.ignore_eos and not req.stop_token_ids:
            req.true_length = req.max_tokens  # nothing can stop it early
        self.policy.on_admit(req)
        self.requests[req.request_id] = req
        self.by_client[(req.client, req.client_request_id)] = req.request_id
        self.waiting.push(req)
        self.kick()

    def schedule(self) -> None:
        if self.backoff:
            self._requeue_due()
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
            view.committed_blocks += self._prefill_blocks(req, view)
            view.reserved_blocks += d.reserve_blocks
            req.reserved_blocks = d.reserve_blocks
            self.to_worker(d.rank, p.RunPrefill(
                req.request_id, req.prompt_token_ids, req.max_tokens, req.temperature, req.top_p, req.top_k,
                req.seed, req.stop_token_ids, req.ignore_eos, d.decode_locally, self._replayed(req),
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
            deadline = self.config.transfer_deadline_s
            first = req.output_token_ids[req.num_replayed]
            self.to_worker(t.dst_rank, p.ReceiveKV(
                req.request_id, t.src_rank, plan.seq_no, deadline, req.prompt_token_ids, first, req.max_tokens,
                req.temperature, req.top_p, req.top_k, req.seed, req.stop_token_ids, req.ignore_eos,
                self.ledger.reservation_tokens(req.request_id), self._replayed(req),
            ))
            self.to_worker(t.src_rank, p.SendKV(req.request_id, t.dst_rank, plan.seq_no, deadline))
        self.reservations.apply_orders(decisions, now)

    @staticmethod
    def _prefill_blocks(req: Request, view: WorkerView) -> int:
        # A mixed worker also writes the first decode token's KV before it reports again.
        return view.blocks_for(req.num_prefill_tokens + (1 if view.role == "mixed" else 0))

    @staticmethod
    def _replayed(req: Request) -> list[int]:
        """The outputs a retried request's prefill recomputes after its prompt."""
        return list(req.output_token_ids[: req.num_replayed]) if req.num_replayed else []

    # --- worker events -----------------------------------------------------------------------

    def on_worker_message(self, msg: Any) -> None:
        view = self.registry.seen(msg.rank)
        if view is None:
            return  # a lost or unknown rank: its requests were already failed
        if isinstance(msg, p.Heartbeat):
            view.free_blocks, view.num_running = msg.free_blocks, msg.num_running
        elif isinstance(msg, p.PrefillDone):
            self._on_prefill_done(msg)
        elif isinstance(msg, p.TokenEvents):
            view.free_blocks = msg.free_blocks
            view.decode_steps += 1
            self._on_tokens(msg, view)
        elif isinstance(msg, p.Preempted):
            view.free_blocks = msg.free_blocks
            self.reservations.acknowledged(msg)
        elif isinstance(msg, p.TransferStatus):
            self._on_transfer(msg)
        elif isinstance(msg, p.Released):
            self._released(msg.request_id, msg.rank)
        elif isinstance(msg, p.WorkerFailed):
            if msg.request_id is None:
                self.worker_lost(msg.rank, msg.message)
            elif msg.request_id in self.requests:
                self.fail(self.requests[msg.request_id], f"worker rank {msg.rank}: {msg.message}")
        self.kick()

    def _on_prefill_done(self, msg: p.PrefillDone) -> None:
        req = self.requests.get(msg.request_id)
        if req is None or req.status is not S.PREFILLING:
            return  # aborted meanwhile: the worker frees it on AbortWork
        view = self.registry.views[msg.rank]
        view.queued_prefill_tokens -= req.num_prefill_tokens
        view.committed_blocks -= self._prefill_blocks(req, view)
        req.output_token_ids.append(msg.first_token)
        self._stream(req, len(req.output_token_ids) - 1)
        if msg.finish_reason is not None:
            self.finish(req, msg.finish_reason)
        elif view.role == "mixed":
            req.transition(S.TRANSFERRING, self.clock())
            req.transition(S.DECODING, self.clock())
        else:
            req.transition(S.TRANSFERRING, self.clock())
            self.kv_waiting.append(req)

    def _on_tokens(self, msg: p.TokenEvents, view: WorkerView) -> None:
        self.reservations.dropped_by_worker(msg.preempted)
        for rid, token, reason in zip(msg.request_ids, msg.token_ids, msg.finish_reasons):
            req = self.requests.get(rid)
            if req is None or req.status not in (S.DECODING, S.PREEMPTED):
                continue
            self.reservations.produced(req, view)
            req.output_token_ids.append(token)
            self._stream(req, len(req.output_token_ids) - 1)
            if reason is not None:
                self.finish(req, reason)
            else:
                self.reservations.check_near_limit(req)

    def _on_transfer(self, msg: p.TransferStatus) -> None:
        req = self.requests.get(msg.request_id)
        if req is None or req.status is not S.TRANSFERRING:
            return
        if msg.state != "done":  # this side freed its blocks; the retry aborts the other side
            self.counters["transfers_failed"] += 1
            reason = f"KV transfer {msg.state} on rank {msg.rank}: {msg.message}"
            self.retry(req, reason, self.config.retry_backoff_s)
            return
        if msg.rank == req.decode_rank:  # the receiver has the KV: decoding starts there
            self.planner.finish(req.request_id)
            view = self.registry.views[msg.rank]
            view.committed_blocks -= self.transfer_blocks.pop(req.request_id)
            view.num_running += 1
            req.transition(S.DECODING, self.clock())
            self.reservations.decoding_started(req, view.decode_steps)

    def _stream(self, req: Request, index: int) -> None:
        if req.stream:
            text = self.codec.new_text(req)
            self.to_client(req.client, p.TokenDelta(req.client_request_id, index, req.output_token_ids[index:], text))

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
        self._release_everywhere(req)
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
        self._release_everywhere(req)
        req.transition(S.FAILED, self.clock())
        self.counters["failed"] += 1
        self._forget(req)
        self.to_client(req.client, p.ErrorReply(req.client_request_id, "failed", message))

    def fail_all(self, message: str) -> None:
        for req in list(self.requests.values()):
            self.fail(req, message)

    def worker_lost(self, rank: int, reason: str) -> None:
        """`rank` died or stopped answering: fence it, tell its peers, retry what it held."""
        view = self.registry.views.get(rank)
        if view is None or not view.alive:
            return
        view.alive = False
        self.lost[rank] = reason
        self.counters["workers_lost"] += 1
        self.to_worker(rank, p.Shutdown())  # a worker that is only slow stops; what it says meanwhile is ignored
        for peer in self.registry.alive_ranks():  # before any AbortWork below, on the same channel
            self.to_worker(peer, p.PeerLost(rank))
        for rid, ranks in list(self.releasing.items()):
            self._released(rid, rank) if rank in ranks else None
        why = f"worker rank {rank} ({view.role}) was lost: {reason}"
        for req in list(self.requests.values()):
            if self._holds(req, rank):
                self.retry(req, why)
        if not self.can_serve():
            for req in list(self.requests.values()):
                self.fail(req, self.cannot_serve_reason())
        self.kick()

    @staticmethod
    def _holds(req: Request, rank: int) -> bool:
        """Whether `rank` holds work, KV or a reservation for `req`."""
        if req.status is S.WAITING_PREFILL:
            return False
        if req.status in (S.DECODING, S.PREEMPTED):  # its prefill worker is done with it
            return req.decode_rank == rank
        return rank in (req.prefill_rank, req.decode_rank)

    def retry(self, req: Request, reason: str, backoff_s: float = 0.0) -> None:
        """Queue `req` again (after `backoff_s`) now that `reason` cost it its work
        (Request.retry), or fail it with every reason once it has used its `max_retries`."""
        limit = self.config.max_retries
        if req.num_retries >= limit:
            earlier = "".join(f"; before that: {r}" for r in reversed(req.retry_reasons))
            tries = f"after {req.num_retries} retries" if req.num_retries else "without a retry"
            self.fail(req, f"{reason} ({tries}; the limit is --max-retries {limit}){earlier}")
            return
        self._release_everywhere(req)
        self._drop_holdings(req)
        old = req.request_id
        req.retry(self.clock(), reason)
        del self.requests[old]
        base = old.removeprefix(f"retry{req.num_retries - 1}:") if req.num_retries > 1 else old
        req.request_id = f"retry{req.num_retries}:{base}"
        while req.request_id in self.requests:  # only a hand-made id could collide
            req.request_id += "+"
        self.requests[req.request_id] = req
        self.by_client[(req.client, req.client_request_id)] = req.request_id
        if backoff_s > 0:
            self.backoff[req.request_id] = (self.clock() + backoff_s, req)
        else:
            self.waiting.push(req)
        self.counters["retries"] += 1
        log.warning("request %s retried as %s: %s", old, req.request_id, reason)
        self.kick()

    def next_retry_in(self) -> float | None:
        """Seconds until the next backed-off retry is due (schedule then); None when none waits."""
        if not self.backoff:
            return None
        return max(0.0, min(due for due, _ in self.backoff.values()) - self.clock())

    def _requeue_due(self) -> None:
        now = self.clock()
        for rid, (due, req) in list(self.backoff.items()):
            if due <= now:
                del self.backoff[rid]
                self.waiting.push(req)

    def can_serve(self) -> bool:
        """Whether the live workers can still carry a request from prompt to last token."""
        alive = {v.role for v in self.registry.views.values() if v.alive}
        return "mixed" in alive or {"prefill", "decode"} <= alive

    def cannot_serve_reason(self) -> str:
        lost = "; ".join(
            f"worker rank {v.rank} ({v.role}) was lost: {self.lost.get(v.rank, 'unknown')}"
            for v in sorted(self.registry.views.values(), key=lambda v: v.rank) if not v.alive
        )
        return f"no live worker can serve requests ({lost}); restart the server"

    def _release_everywhere(self, req: Request) -> None:
        """Tell every worker holding something for `req` to free it; undo our accounting."""
        ranks: set[int] = set()
        views = self.registry.views
        if req.status is S.WAITING_PREFILL:
            self.waiting.remove(req.request_id)
        elif req.status is S.PREFILLING:
            assert req.prefill_rank is not None
            view = views[req.prefill_rank]
            view.queued_prefill_tokens -= req.num_prefill_tokens
            view.committed_blocks -= self._prefill_blocks(req, view)
            ranks.add(req.prefill_rank)
        elif req.status is S.TRANSFERRING:
            assert req.prefill_rank is not None
            ranks.add(req.prefill_rank)
            if req in self.kv_waiting:
                self.kv_waiting.remove(req)
            if req.request_id in self.transfer_blocks:  # planned: both sides are committed to it
                assert req.decode_rank is not None
                views[req.decode_rank].committed_blocks -= self.transfer_blocks.pop(req.request_id)
                self.planner.finish(req.request_id)
                ranks.add(req.decode_rank)
        elif req.decode_rank is not None:
            ranks.add(req.decode_rank)
        ranks = {r for r in ranks if views[r].alive}
        for rank in ranks:
            self.to_worker(rank, p.AbortWork(req.request_id))
        if ranks:
            self.releasing[req.request_id] = ranks

    def _released(self, request_id: str, rank: int) -> None:
        ranks = self.releasing.get(request_id)
        if ranks is not None:
            ranks.discard(rank)
            if not ranks:
                del self.releasing[request_id]

    def _end(self, req: Request, reason: str) -> None:
        self._forget(req)
        self.to_client(req.client, p.RequestFinished(
            req.client_request_id, req.output_token_ids, self.codec.decode(req.output_token_ids), reason,
            req.num_prompt_tokens, **_timings(req),
        ))

    def _forget(self, req: Request) -> None:
        self._drop_holdings(req)
        self.backoff.pop(req.request_id, None)
        self.requests.pop(req.request_id, None)
        self.by_client.pop((req.client, req.client_request_id), None)

    def _drop_holdings(self, req: Request) -> None:
        """Undo the coordinator-side holdings of `req`: reservations and decode-side queues."""
        self.reservations.forget(req)

    # --- stats -------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        views = self.registry.views.values()
        by_status: dict[str, float] = {s.value: 0.0 for s in S if not s.terminal}
        for req in self.requests.values():
            by_status[req.status.value] += 1
        values = {
            "requests_in_flight": float(len(self.requests)),
            "queue_waiting_prefill": float(len(self.waiting)),
            "queue_retry_backoff": float(len(self.backoff)),
            "queue_kv_waiting": float(len(self.kv_waiting)),
            "requests_releasing": float(len(self.releasing)),
            "reserved_blocks": float(
                sum(max(0, v.committed_blocks) + v.reserved_blocks for v in views)
                + sum(led.reserved_blocks for led in self.ledger.ranks.values())
            ),
            "transfers_in_flight": float(len(self.transfer_blocks)),
            "workers_alive": float(sum(v.alive for v in views)),
            "queue_near_limit": float(len(self.near_limit)),
            "queue_preempted": float(len(self.preempted)),
        }
        done = self.counters["predicted"]
        values["prediction_mean_abs_error"] = self.prediction_abs_error / done if done else 0.0
        values.update({f"queue_bucket.{b}": float(n) for b, n in self.waiting.lengths().items()})
        for v in views:  # per worker: decode-side reservations, physical use, and what pipelining lends
            led = self.ledger.ranks.get(v.rank)
            reserved = led.reserved_blocks if led else 0
            values[f"worker.{v.rank}.reserved_blocks"] = float(reserved + v.reserved_blocks)
            values[f"worker.{v.rank}.used_blocks"] = float(v.num_blocks - v.free_blocks)
            # Reservations beyond the physical pool: space promised to guests out of hosts' future growth.
            values[f"worker.{v.rank}.lent_blocks"] = float(max(0, reserved - v.num_blocks))
        values.update({f"status.{k}": v for k, v in by_status.items()})
        values.update({k: float(v) for k, v in self.counters.items()})
        values.update(self.dispatch_ms.summary("dispatch_ms"))
        values.update(self.schedule_us.summary("schedule_call_us"))
        return values


def _timings(req: Request) -> dict[str, float]:
    # `is None`, not falsiness: a simulated clock starts at 0.0, a time like any other.
    end = req.events[-1].time
    first_token = _first(req.first_time(S.TRANSFERRING), req.first_time(S.DECODING), end)
    prefilling = req.first_time(S.PREFILLING)
    decoding = req.first_time(S.DECODING)
    n = len(req.output_token_ids)
    ms = 1e3
    return dict(
        ttft_ms=(first_token - req.arrival) * ms if n else 0.0,
        tpot_ms=(end - first_token) * ms / (n - 1) if n > 1 else 0.0,
        e2e_ms=(end - req.arrival) * ms,
        queue_ms=(_first(prefilling, end) - req.arrival) * ms,
        prefill_ms=(first_token - prefilling) * ms if prefilling is not None and n else 0.0,
        transfer_ms=(decoding - first_token) * ms if decoding is not None else 0.0,
    )


def _first(*times: float | None) -> float:
    return next(t for t in times if t is not None)

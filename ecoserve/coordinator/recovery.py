"""Faults (DESIGN §10): lost workers, retries and their backoff, and releasing what workers hold.

A lost worker (its process exited, or its heartbeats stopped) is fenced (told to shut down;
anything it says later is ignored), its peers are told to abandon their KV transfers with it
(`PeerLost`), and each request it held work for is retried; so is a request whose KV transfer
failed or missed its deadline. A retry releases everything any worker held for the request,
gives it a fresh worker-facing id (`retry<k>:<id>`, so a late message about the old attempt
cannot touch the new one) and queues it again; its next prefill recomputes the prompt plus the
tokens already streamed, and the stream goes on from there. After `max_retries` retries the
request fails with an error naming every loss.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ecoserve import protocol as p
from ecoserve.coordinator.request import Request, RequestStatus as S

if TYPE_CHECKING:
    from ecoserve.coordinator.lifecycle import Lifecycle

log = logging.getLogger(__name__)


class Recovery:
    """Losses, retries and releases for the lifecycle `lc`."""

    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc

    def worker_lost(self, rank: int, reason: str) -> None:
        """`rank` died or stopped answering: fence it, tell its peers, retry what it held."""
        lc = self.lc
        view = lc.registry.views.get(rank)
        if view is None or not view.alive:
            return
        view.alive = False
        lc.lost[rank] = reason
        lc.counters["workers_lost"] += 1
        lc.to_worker(rank, p.Shutdown())  # a worker that is only slow stops; what it says meanwhile is ignored
        for peer in lc.registry.alive_ranks():  # before any AbortWork below, on the same channel
            lc.to_worker(peer, p.PeerLost(rank))
        for rid, ranks in list(lc.releasing.items()):
            self.released(rid, rank) if rank in ranks else None
        why = f"worker rank {rank} ({view.role}) was lost: {reason}"
        for req in list(lc.requests.values()):
            if self._holds(req, rank):
                self.retry(req, why)
        if not self.can_serve():
            for req in list(lc.requests.values()):
                lc.fail(req, self.cannot_serve_reason())
        lc.kick()

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
        lc = self.lc
        limit = lc.config.max_retries
        if req.num_retries >= limit:
            earlier = "".join(f"; before that: {r}" for r in reversed(req.retry_reasons))
            tries = f"after {req.num_retries} retries" if req.num_retries else "without a retry"
            lc.fail(req, f"{reason} ({tries}; the limit is --max-retries {limit}){earlier}")
            return
        self.release_everywhere(req)
        lc.reservations.forget(req)
        old = req.request_id
        req.retry(lc.clock(), reason)
        del lc.requests[old]
        base = old.removeprefix(f"retry{req.num_retries - 1}:") if req.num_retries > 1 else old
        req.request_id = f"retry{req.num_retries}:{base}"
        while req.request_id in lc.requests:  # only a hand-made id could collide
            req.request_id += "+"
        lc.requests[req.request_id] = req
        lc.by_client[(req.client, req.client_request_id)] = req.request_id
        if backoff_s > 0:
            lc.backoff[req.request_id] = (lc.clock() + backoff_s, req)
        else:
            lc.waiting.push(req)
        lc.counters["retries"] += 1
        log.warning("request %s retried as %s: %s", old, req.request_id, reason)
        lc.kick()

    def next_retry_in(self) -> float | None:
        """Seconds until the next backed-off retry is due (schedule then); None when none waits."""
        lc = self.lc
        if not lc.backoff:
            return None
        return max(0.0, min(due for due, _ in lc.backoff.values()) - lc.clock())

    def requeue_due(self) -> None:
        lc = self.lc
        now = lc.clock()
        for rid, (due, req) in list(lc.backoff.items()):
            if due <= now:
                del lc.backoff[rid]
                lc.waiting.push(req)

    def can_serve(self) -> bool:
        """Whether the live workers can still carry a request from prompt to last token."""
        lc = self.lc
        alive = {v.role for v in lc.registry.views.values() if v.alive}
        return "mixed" in alive or {"prefill", "decode"} <= alive

    def cannot_serve_reason(self) -> str:
        lc = self.lc
        lost = "; ".join(
            f"worker rank {v.rank} ({v.role}) was lost: {lc.lost.get(v.rank, 'unknown')}"
            for v in sorted(lc.registry.views.values(), key=lambda v: v.rank) if not v.alive
        )
        return f"no live worker can serve requests ({lost}); restart the server"

    def release_everywhere(self, req: Request) -> None:
        """Tell every worker holding something for `req` to free it; undo our accounting."""
        lc = self.lc
        ranks: set[int] = set()
        views = lc.registry.views
        if req.status is S.WAITING_PREFILL:
            lc.waiting.remove(req.request_id)
        elif req.status is S.PREFILLING:
            assert req.prefill_rank is not None
            view = views[req.prefill_rank]
            view.queued_prefill_tokens -= req.num_prefill_tokens
            view.committed_blocks -= view.prefill_blocks(req.num_prefill_tokens)
            ranks.add(req.prefill_rank)
        elif req.status is S.TRANSFERRING:
            assert req.prefill_rank is not None
            ranks.add(req.prefill_rank)
            if req in lc.kv_waiting:
                lc.kv_waiting.remove(req)
            if req.request_id in lc.transfer_blocks:  # planned: both sides are committed to it
                assert req.decode_rank is not None
                views[req.decode_rank].committed_blocks -= lc.transfer_blocks.pop(req.request_id)
                lc.planner.finish(req.request_id)
                ranks.add(req.decode_rank)
        elif req.decode_rank is not None:
            ranks.add(req.decode_rank)
        ranks = {r for r in ranks if views[r].alive}
        for rank in ranks:
            lc.to_worker(rank, p.AbortWork(req.request_id))
        if ranks:
            lc.releasing[req.request_id] = ranks

    def released(self, request_id: str, rank: int) -> None:
        lc = self.lc
        ranks = lc.releasing.get(request_id)
        if ranks is not None:
            ranks.discard(rank)
            if not ranks:
                del lc.releasing[request_id]

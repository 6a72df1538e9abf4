"""Worker news folded into the request lifecycle: prefills done, decode tokens (streamed on to
their clients), KV transfers done or failed, releases confirmed, workers failing. Reserved
requests move through `Reservations`; losses and failed transfers go to `Recovery`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ecoserve import protocol as p
from ecoserve.coordinator.policy import WorkerView
from ecoserve.coordinator.request import Request, RequestStatus as S

if TYPE_CHECKING:
    from ecoserve.coordinator.lifecycle import Lifecycle


class WorkerEvents:
    """Folds each worker message into the lifecycle `lc` it belongs to."""

    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc

    def on_message(self, msg: Any) -> None:
        lc = self.lc
        view = lc.registry.seen(msg.rank)
        if view is None:
            return  # a lost or unknown rank: its requests were already failed
        if isinstance(msg, p.Heartbeat):
            view.free_blocks, view.num_running = msg.free_blocks, msg.num_running
        elif isinstance(msg, p.PrefillDone):
            if msg.free_blocks is not None:  # before the prompt's commitment goes: its KV is held there
                view.free_blocks = msg.free_blocks
            self._on_prefill_done(msg)
        elif isinstance(msg, p.TokenEvents):
            view.free_blocks = msg.free_blocks
            view.decode_steps += 1
            self._on_tokens(msg, view)
        elif isinstance(msg, p.Preempted):
            view.free_blocks = msg.free_blocks
            lc.reservations.acknowledged(msg)
        elif isinstance(msg, p.TransferStatus):
            if msg.free_blocks is not None:  # a sender's blocks come back as its transfers end
                view.free_blocks = msg.free_blocks
            self._on_transfer(msg)
        elif isinstance(msg, p.Released):
            lc.recovery.released(msg.request_id, msg.rank)
        elif isinstance(msg, p.WorkerFailed):
            if msg.request_id is None:
                lc.worker_lost(msg.rank, msg.message)
            elif msg.request_id in lc.requests:
                lc.fail(lc.requests[msg.request_id], f"worker rank {msg.rank}: {msg.message}")
        lc.kick()

    def _on_prefill_done(self, msg: p.PrefillDone) -> None:
        lc = self.lc
        req = lc.requests.get(msg.request_id)
        if req is None or req.status is not S.PREFILLING:
            return  # aborted meanwhile: the worker frees it on AbortWork
        view = lc.registry.views[msg.rank]
        view.queued_prefill_tokens -= req.num_prefill_tokens
        view.committed_blocks -= view.prefill_blocks(req.num_prefill_tokens)
        req.output_token_ids.append(msg.first_token)
        self._stream(req, len(req.output_token_ids) - 1)
        if msg.finish_reason is not None:
            lc.finish(req, msg.finish_reason)
        elif view.role == "mixed":
            req.transition(S.TRANSFERRING, lc.clock())
            req.transition(S.DECODING, lc.clock())
            # Its KV is where it decodes: a reservation made for it there starts now, as a
            # transferred request's does when its KV lands (extensions and victims read it).
            lc.reservations.decoding_started(req, view.decode_steps)
        else:
            req.transition(S.TRANSFERRING, lc.clock())
            lc.kv_waiting.append(req)

    def _on_tokens(self, msg: p.TokenEvents, view: WorkerView) -> None:
        lc = self.lc
        lc.reservations.dropped_by_worker(msg.preempted)
        for rid, token, reason in zip(msg.request_ids, msg.token_ids, msg.finish_reasons):
            req = lc.requests.get(rid)
            if req is None or req.status not in (S.DECODING, S.PREEMPTED):
                continue
            lc.reservations.produced(req, view)
            req.output_token_ids.append(token)
            self._stream(req, len(req.output_token_ids) - 1)
            if reason is not None:
                lc.finish(req, reason)
            else:
                lc.reservations.check_near_limit(req)

    def _on_transfer(self, msg: p.TransferStatus) -> None:
        lc = self.lc
        req = lc.requests.get(msg.request_id)
        if req is None or req.status is not S.TRANSFERRING:
            return
        if msg.state != "done":  # this side freed its blocks; the retry aborts the other side
            lc.counters["transfers_failed"] += 1
            reason = f"KV transfer {msg.state} on rank {msg.rank}: {msg.message}"
            lc.retry(req, reason, lc.config.retry_backoff_s)
            return
        if msg.rank == req.decode_rank:  # the receiver has the KV: decoding starts there
            lc.counters["transfers_done"] += 1
            lc.planner.finish(req.request_id)
            view = lc.registry.views[msg.rank]
            view.committed_blocks -= lc.transfer_blocks.pop(req.request_id)
            view.num_running += 1
            req.transition(S.DECODING, lc.clock())
            lc.reservations.decoding_started(req, view.decode_steps)

    def _stream(self, req: Request, index: int) -> None:
        lc = self.lc
        if req.stream:
            text = lc.codec.new_text(req)
            lc.to_client(req.client, p.TokenDelta(req.client_request_id, index, req.output_token_ids[index:], text))

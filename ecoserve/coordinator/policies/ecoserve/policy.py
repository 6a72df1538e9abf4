"""The `ecoserve` policy (DESIGN §4.1) on three layouts: a prefill and a decode pool; mixed workers
alone (the paper's colocated form); prefill workers beside mixed ones (hybrid).

On a mixed worker each iteration carries its running generation tasks (GTs) and prompt tokens
(PTs) up to a budget derived from the TPOT SLO: the most prompt tokens for which the worker's
latency profile predicts the step within the smallest TPOT target of the requests decoding
there (their SLO less `tpot_margin`). The worker computes that budget each step (the "slo"
schedule: `LatencyProfile.prompt_budget`), since only it knows the batch of that step; the
policy sets each request's target (`DispatchPrefill.tpot_target_ms`) and decides, as here, what
is admitted and where, and the KV reserved for it. Admission places a cohort locally first (a
mixed worker whose prompt queue has room prefills it and keeps it: no transfer), else on the
prefill worker with the most room, its KV then moving to the decode or mixed worker holding
the reservation. Prefill workers never decode (a departure from the issue's open question, see
DESIGN §4.1: their pools would then hold reservations that the transfer path cannot see).

The paper is not public in full; where it is silent these definitions are ours (DESIGN §4.1
states them), and so are the constants below.

Each scheduling round, in this order (KVC holders first, so KVC is released earliest):

1. **Transfers.** Prompts done on a prefill worker move to the decode worker that holds their
   reservation at once, most KV first (`ordering`). Without `exact_allocation` the reservation
   is made only now, when the KV exists, and a prompt may wait for decode memory.
2. **Misprediction.** A decoding request within `extend_ahead` tokens of its reservation is
   extended by one bucket if its worker's timeline allows. Once it has used its reservation up
   (so it was under-predicted, not merely close), victims on that worker are preempted, loosest TPOT slack first, then longest predicted remaining, then cheapest to
   move, each by swap or recompute, whichever `CostModel` says is cheaper.
3. **Resumes.** Preempted requests return to their worker, swapped ones (holding host KVC)
   first, then by KV size, when the timeline has room again. While one waits, no new cohort
   is admitted to its worker.
4. **Admission.** Requests wait in one queue per RL bucket. The most urgent bucket head (TTFT
   deadline, then shorter prompt; oldest first without `ordering`) picks the bucket; the
   bucket's oldest requests form a cohort that fits the room left in the roomiest prompt queue
   (`queue_factor` token budgets; a longer prompt goes only to an idle worker), and the
   whole cohort is reserved on one decode or mixed worker in one timeline check
   (`ledger.Timeline`), then dispatched to prefill together (`_place`: locally first). A
   cohort that fits nowhere is halved until it fits; when even its head does not, admission
   stops (no bypass, so no bucket starves).

Mechanisms can be switched off for ablations: `pipelining` (admit on the exact sum of
reservations instead of the timeline), `rl_buckets` (one queue, cohorts of one, the raw
prediction as horizon), `ordering` (FCFS everywhere), `exact_allocation` (reserve at transfer
time instead of before prefill; a local prompt then reserves nothing and its worker takes blocks
on demand), `slo_budget` (mixed workers run the fixed chunked budget instead). A decode worker's batch is capped so that its predicted step
time meets the TPOT SLO when the cost model has a decode fit (`CostModel.has_decode_fit`).
"""

from __future__ import annotations

import math

from ecoserve.coordinator.policies.ecoserve.config import EcoServeConfig
from ecoserve.coordinator.policies.ecoserve.queues import BucketQueues, Cursor
from ecoserve.coordinator.policies.ecoserve.round import Round
from ecoserve.coordinator.policy import (
    BasePolicy, Decisions, DispatchPrefill, Extend, FIFOQueue, PreemptDecode, Reserve, ResumeDecode,
    SchedulerState, StartTransfer, WorkerView,
)
from ecoserve.coordinator.request import Request, RequestStatus
from ecoserve.predictor.predictors import Predictor, PredictionQuery, make_predictor


class EcoServePolicy(BasePolicy):
    name = "ecoserve"
    needs_roles: tuple[frozenset[str], ...] = (
        frozenset({"prefill", "decode"}), frozenset({"mixed"}), frozenset({"prefill", "mixed"}),
    )

    def __init__(self, config: EcoServeConfig | None = None, predictor: Predictor | None = None) -> None:
        self.config = config or EcoServeConfig()
        c = self.config
        self.predictor: Predictor | None = predictor or make_predictor(c.predictor, c.buckets, **c.predictor_options)
        self.extend_ahead = c.extend_ahead
        self.start_delay = c.start_delay
        self.mixed_schedule = "slo" if c.slo_budget else "chunked"

    # --- admission hooks -------------------------------------------------------------------------

    def new_queue(self) -> FIFOQueue:
        return BucketQueues()

    def on_admit(self, req: Request) -> None:
        # What the client sent, nothing more: an oracle predictor looks the true length up itself
        # (the lifecycle binds its lookup to oracles only; see predictor/predictors.py).
        query = PredictionQuery(req.num_prompt_tokens, req.max_tokens, req.prompt_token_ids, req.request_id)
        assert self.predictor is not None
        pred = self.predictor.predict(query)
        req.raw_prediction = pred.length
        req.predicted_tokens = pred.bucket if self.config.rl_buckets else pred.length

    def on_finish(self, req: Request) -> None:
        assert self.predictor is not None
        self.predictor.observe(req.num_prompt_tokens, max(1, len(req.output_token_ids)))

    # --- one round -------------------------------------------------------------------------------

    def schedule(self, state: SchedulerState) -> Decisions:
        out = Decisions()
        waiting = state.waiting
        assert isinstance(waiting, BucketQueues)
        if not (waiting.buckets or state.kv_waiting or state.near_limit or state.preempted):
            return out  # nothing to place, extend or resume: most rounds of a lightly loaded cluster
        # Reservations live where requests decode (decode and mixed workers); prompts are
        # prefilled on prefill workers or, locally, on mixed ones.
        decoders = {w.rank: w for w in state.workers.values() if w.alive and w.role in ("decode", "mixed")}
        sites = [w for w in state.workers.values() if w.alive and w.role in ("prefill", "mixed")]
        if not decoders or not sites:
            return out
        round_ = Round(self.config, state, decoders)
        self._transfers(state, round_, out)
        blocked = self._mispredictions(state, round_, out)
        blocked |= self._resumes(state, round_, out)
        self._admit(state, sites, round_, blocked, out)
        return out

    def tpot_target_ms(self, req: Request) -> float | None:
        """The step time a mixed worker keeps to while `req` decodes there: its TPOT SLO less the margin."""
        slo = req.slo_tpot_ms or self.config.slo_tpot_ms
        return None if slo is None else slo * (1 - self.config.tpot_margin)

    def _transfers(self, state: SchedulerState, r: Round, out: Decisions) -> None:
        queue = list(state.kv_waiting)
        if self.config.ordering:
            queue.sort(key=lambda q: -q.num_prefill_tokens)
        for req in queue:
            assert req.prefill_rank is not None and req.predicted_tokens is not None
            if req.decode_rank is None:  # exact allocation off: reserve now that the KV exists
                h = req.predicted_tokens
                w = r.place([(req.request_id, req.num_prefill_tokens)], h, req.slo_tpot_ms, physical=True)
                if w is None:
                    break  # FCFS among prompts waiting for decode memory
                out.reservations.append(Reserve(w.rank, h, ((req.request_id, req.num_prefill_tokens),)))
                rank = w.rank
            else:
                rank = req.decode_rank
                if rank not in r.decoders:
                    continue  # its worker is lost: the lifecycle retries the request
            w = r.decoders[rank]
            out.transfers.append(StartTransfer(req.request_id, req.prefill_rank, rank, w.blocks_for(req.num_prefill_tokens),
                                               self.tpot_target_ms(req)))

    def _mispredictions(self, state: SchedulerState, r: Round, out: Decisions) -> set[int]:
        """Extend requests close to their reservation; preempt victims where that does not fit.
        Returns the ranks where an extension still waits (no new cohort goes there)."""
        blocked: set[int] = set()
        victims_taken: set[str] = set()  # preempted or extended this round: not victims (again)
        reqs = list(state.near_limit.values())
        if self.config.ordering:
            reqs.sort(key=lambda q: -(q.num_prompt_tokens + len(q.output_token_ids)))
        for req in reqs:
            # A request the worker dropped for room (a local recompute: PREEMPTED, no mode) keeps
            # its reservation; if it was held at its cap, no token can bring it back to DECODING
            # until the cap is raised, so it is extended like a decoding one.
            local = req.status is RequestStatus.PREEMPTED and req.preempt_mode is None
            if req.request_id in victims_taken or not (req.status is RequestStatus.DECODING or local) or req.resuming:
                continue
            assert req.decode_rank is not None and req.predicted_tokens is not None
            if req.predicted_tokens >= req.max_tokens or req.decode_rank not in r.decoders:
                continue
            # The worker caps a request at whole blocks, so it may already hold up to a block's
            # slack past its reservation by the time we hear: the next horizon starts past that
            # slack, or the extension could be smaller than what the worker holds (it refuses).
            reserved = state.ledger.reservation_tokens(req.request_id)
            w = r.decoders[req.decode_rank]
            slack = w.blocks_for(reserved) * w.block_size - reserved if reserved is not None else 0
            new_total = self._next_horizon(req.predicted_tokens + slack, req.max_tokens)
            old = state.ledger.member_shape(req.request_id, r.decoders[req.decode_rank].decode_steps)
            if old is None:
                continue
            _, kv, a, h, _ = old
            # Its own ramp, from its own start (the lifecycle re-reserves it from there too).
            started = req.decode_start_step if req.decode_start_step is not None else a
            horizon = h + new_total - req.predicted_tokens
            new = (1, kv, started, horizon, started + horizon)
            rank = req.decode_rank
            now = r.decoders[rank].decode_steps
            grow = r.blocks_delta(req, new_total)
            for _ in range(self.config.max_victims + 1):
                if r.fits(rank, [new], [old], 0, exact=grow):
                    out.extensions.append(Extend(req.request_id, new_total))
                    r.commit(rank, new, grow, remove=old)
                    victims_taken.add(req.request_id)
                    break
                if len(req.output_token_ids) < req.predicted_tokens:
                    break  # not exhausted yet: it may still end within its prediction; extend later
                victim = self._victim(state, rank, victims_taken, r)
                if victim is None:
                    blocked.add(rank)
                    break
                victims_taken.add(victim.request_id)
                shape = state.ledger.member_shape(victim.request_id, now)
                assert shape is not None
                r.drop(rank, shape, r.exact_blocks_of(victim))
                mode = self._mode(victim, r.decoders[rank])
                out.preemptions.append(PreemptDecode(victim.request_id, mode))
                if victim is req:
                    break
            else:
                blocked.add(rank)
        return blocked

    def _next_horizon(self, current: int, max_tokens: int) -> int:
        bounds = self.config.buckets.bounds
        nxt = next((b for b in bounds if b > current), current * 2)
        return min(max_tokens, nxt)

    def _victim(self, state: SchedulerState, rank: int, taken: set[str], r: Round) -> Request | None:
        led = state.ledger.ranks.get(rank)
        if led is None:
            return None
        best: tuple[float, float, float] | None = None
        chosen: Request | None = None
        for cohort in led.cohorts.values():
            for rid in cohort.members:
                req = state.requests.get(rid)
                if req is None or rid in taken or rid in cohort.pending or req.status is not RequestStatus.DECODING:
                    continue
                key = (-self._tpot_slack_ms(req, state.now), -self._remaining(req), self._kv_tokens(req))
                if best is None or key < best:
                    best, chosen = key, req
        return chosen

    def _tpot_slack_ms(self, req: Request, now: float) -> float:
        slo = req.slo_tpot_ms or self.config.slo_tpot_ms
        first = req.first_time(RequestStatus.TRANSFERRING) or req.first_time(RequestStatus.DECODING)
        if slo is None or first is None:
            return math.inf
        return slo * max(1, len(req.output_token_ids) - 1) - (now - first) * 1e3

    @staticmethod
    def _remaining(req: Request) -> int:
        return max(0, (req.predicted_tokens or req.max_tokens) - len(req.output_token_ids))

    @staticmethod
    def _kv_tokens(req: Request) -> int:
        return req.num_prompt_tokens + len(req.output_token_ids)

    def _mode(self, req: Request, w: WorkerView) -> str:
        if self.config.preempt_mode != "auto":
            return self.config.preempt_mode
        tokens = self._kv_tokens(req)
        costs = self.config.costs
        swap = costs.swap_ms(tokens, w.kv_bytes_per_token or None)
        return "swap" if swap <= costs.recompute_ms(tokens) else "recompute"

    def _resumes(self, state: SchedulerState, r: Round, out: Decisions) -> set[int]:
        blocked: set[int] = set()
        reqs = list(state.preempted.values())
        if self.config.ordering:
            reqs.sort(key=lambda q: (q.preempt_mode != "swap", -self._kv_tokens(q)))
        for req in reqs:
            rank = req.decode_rank
            if rank is None or rank not in r.decoders or rank in blocked:
                continue
            assert req.predicted_tokens is not None
            produced = len(req.output_token_ids)
            total = req.predicted_tokens if req.predicted_tokens > produced else self._next_horizon(produced, req.max_tokens)
            h = max(1, total - produced)
            tokens = self._kv_tokens(req)
            w = r.decoders[rank]
            swap_in = w.blocks_for(tokens) if req.preempt_mode == "swap" else 0
            shape = r.pending(rank, 1, tokens, h)
            if r.fits(rank, [shape], [], 1, exact=w.blocks_for(tokens + h), physical=swap_in):
                r.commit(rank, shape, w.blocks_for(tokens + h), swap_in)
                out.resumes.append(ResumeDecode(req.request_id, total))
            else:
                blocked.add(rank)
        return blocked

    def _admit(self, state: SchedulerState, sites: list[WorkerView], r: Round, blocked: set[int], out: Decisions) -> None:
        c = self.config
        queue = state.waiting
        assert isinstance(queue, BucketQueues)
        if not queue.buckets:
            return
        room = {w.rank: c.queue_factor * w.token_budget - w.queued_prefill_tokens for w in sites}
        idle = {w.rank: w.queued_prefill_tokens == 0 for w in sites}
        avail = {w.rank: w.available_blocks for w in sites}
        cursors: dict[int, Cursor] = {}
        r.blocked = blocked
        while True:
            pw = max(sites, key=lambda w: (room[w.rank] / w.token_budget, -w.rank))  # the most room
            if room[pw.rank] <= 0 and not any(idle.values()):
                return
            bucket = self._next_bucket(queue, cursors)
            if bucket is None:
                return
            cur = cursors[bucket]
            group: list[Request] = []
            tokens = 0
            head = cur.head
            while head is not None and len(group) < (c.max_cohort if c.rl_buckets else 1):
                p = head.num_prefill_tokens
                if group and (tokens + p > room[pw.rank] or pw.blocks_for(tokens + p) + len(group) > avail[pw.rank]):
                    break
                group.append(head)
                tokens += p
                head = cur.peek(len(group))
            placed, site, local = self._place(group, bucket, r, sites, room, idle, avail, out, state.now)
            if site is None:
                return  # the most urgent cohort fits nowhere: no bypass
            for req in group[:placed]:
                cur.pop()
                tpot = self.tpot_target_ms(req) if local else None
                out.prefills.append(DispatchPrefill(req.request_id, site.rank, decode_locally=local, tpot_target_ms=tpot))
                room[site.rank] -= req.num_prefill_tokens
                avail[site.rank] -= site.blocks_for(req.num_prefill_tokens)
            idle[site.rank] = False

    def _place(
        self, group: list[Request], horizon: int, r: Round, sites: list[WorkerView], room: dict[int, float],
        idle: dict[int, bool], avail: dict[int, int], out: Decisions, now: float,
    ) -> tuple[int, WorkerView | None, bool]:
        """Where the longest prefix of `group` (halving) is prefilled and reserved: (how many, the
        worker that prefills them, whether it also decodes them).

        First locally, on a mixed worker whose prompt queue has room (or is empty) and, where a
        prefill worker could take it instead, whose iterations' prompt budget is predicted to reach
        it within its TTFT (`_local_in_time`): no transfer, and the prompt fills the spare budget of
        that worker's decode iterations. Else on the
        prefill worker with the most room, with the reservation on any decode or mixed worker,
        which receives the KV. Without `exact_allocation` nothing is reserved now: a local
        prompt needs only physical room for itself, a remote one is reserved at transfer time.
        """
        slo = min((q.slo_tpot_ms for q in group if q.slo_tpot_ms), default=None)
        n = len(group)
        while n >= 1:
            members = [(q.request_id, q.num_prefill_tokens) for q in group[:n]]
            tokens = sum(t for _, t in members)

            def queue_ok(w: WorkerView) -> bool:
                return room[w.rank] >= tokens or idle[w.rank]

            local = [w for w in sites if w.role == "mixed" and queue_ok(w)]
            if any(w.role == "prefill" for w in sites):
                local = [w for w in local if self._local_in_time(w, group[:n], tokens, room, r, now)]
            if local and self.config.exact_allocation:
                # the shortest prompt queue first (the prompt's TTFT), then the least KV load
                order = sorted(local, key=lambda x: (-room[x.rank] / x.token_budget, r.load(x.rank), x.rank))
                w = r.place(members, horizon, slo, ranks=[x.rank for x in order])
                if w is not None:
                    out.reservations.append(Reserve(w.rank, horizon, tuple(members)))
                    return n, w, True
            elif local:
                fits = [w for w in local if w.blocks_for(tokens) + n <= avail[w.rank] and w.rank not in r.blocked]
                if fits:
                    return n, max(fits, key=lambda w: (avail[w.rank], -w.rank)), True
            remote = [w for w in sites if w.role == "prefill" and queue_ok(w) and w.blocks_for(tokens) + n <= avail[w.rank]]
            if remote:
                pw = max(remote, key=lambda w: (room[w.rank] / w.token_budget, -w.rank))
                if not self.config.exact_allocation:
                    return n, pw, False  # reserved at transfer time instead
                w = r.place(members, horizon, slo)
                if w is not None:
                    out.reservations.append(Reserve(w.rank, horizon, tuple(members)))
                    return n, pw, False
            n //= 2
        return 0, None, False

    def _local_in_time(
        self, w: WorkerView, reqs: list[Request], tokens: int, room: dict[int, float], r: Round, now: float,
    ) -> bool:
        """Whether mixed worker `w` is predicted to prefill `reqs` (`tokens` prompt tokens) within
        their TTFT: the prompt tokens queued there before them, at the prompt budget its
        iterations have now (its reserved members decoding over the KV it holds), one TPOT
        target per iteration. True without the fits or the SLOs to tell."""
        c = self.config
        targets = [t for t in (self.tpot_target_ms(q) for q in reqs) if t is not None]
        ttfts = [q.slo_ttft_ms for q in reqs if q.slo_ttft_ms]
        if not (c.costs.has_decode_fit and targets and ttfts):
            return True
        target = min(targets)
        context = (w.num_blocks - w.available_blocks) * w.block_size
        per_step = c.costs.profile.prompt_budget(target, r.members[w.rank], context, cap=w.token_budget)
        if per_step <= 0:
            return False
        queued = c.queue_factor * w.token_budget - room[w.rank] + tokens
        waited_ms = (now - min(q.arrival for q in reqs)) * 1e3
        return waited_ms + math.ceil(queued / per_step) * target <= min(ttfts)

    def _next_bucket(self, queue: BucketQueues, cursors: dict[int, Cursor]) -> int | None:
        best: tuple[float, ...] | None = None
        chosen = None
        for bucket, items in queue.buckets.items():
            cur = cursors.get(bucket)
            if cur is None:
                cur = cursors[bucket] = Cursor(iter(items.values()))
            head = cur.head
            if head is None:
                continue
            key = (head.ttft_deadline, head.num_prompt_tokens, head.arrival) if self.config.ordering else (head.arrival,)
            if best is None or key < best:
                best, chosen = key, bucket
        return chosen

"""Discrete-event simulator: the real coordinator (`Lifecycle` + policy) against simulated workers.

The coordinator side is the live system's own code: `Lifecycle` with the chosen policy, on a
simulated clock, receiving the real protocol messages (`RunPrefill`, `ReceiveKV`, `Preempt`,
`PrefillDone`, `TransferStatus`, ...). Only the workers are simulated, and time advances by the
latency model (`latency.profile.LatencyProfile`, DistServe's form):

- a prefill step takes `a + b·Σl + c·Σl²` ms for the prompts it batches (whole prompts up to
  the worker's token budget; a longer prompt runs alone);
- a decode step takes `a + b·Σctx + c·batch` ms for its running requests;
- a mixed (colocated) step does both, chunked prefill filling the budget left by decoding, in
  one pass: the profile's `mixed_ms` (fused: the two less the smaller fixed cost a, unless the
  profile measured the additive form to fit better);
- a KV transfer takes `bytes / (link bandwidth · TP) + latency` (each GPU of a tensor-parallel
  group moves its own shard), transfers from one prefill instance one after another;
- swapping a preempted request out and back costs `bytes / swap bandwidth` each way, added to
  the worker's next step; recomputing costs a prefill of everything it had.

Speed: a decode worker advances its whole batch one step per event and touches a request only
when something happens to it (its end, the point where it nears or reaches its reservation);
KV blocks are granted per step to every request crossing a block boundary at once (requests
are counted by the step residue at which they cross), so the cost is per step and per request,
not per token or per block. The coordinator sees the same state a live one would: each decode
step's count and free blocks on the worker views, and a request's output length.
Deterministic: ties break by event order.

Requests carry only what a client sends (DESIGN §7): `max_tokens` is the client's cap (by
default the context left after the prompt, `MAX_TOTAL_LEN - prompt`, as DistServe's and vLLM's
ShareGPT benchmarks send for OPT), with EOS ignored, and the simulated worker ends each request
at its trace length (clipped to the cap; `SimResult.counters["outputs_clipped"]` counts those).
The trace length reaches oracle predictors only (`SimLifecycle.true_length`); no policy sees it.

Files: this one is the event loop (arrivals, steps, transfers, samples); `worker.py` the
simulated worker; `lifecycle.py` the coordinator side (`SimLifecycle`, `DecodeProgress`);
`instance.py` what an instance is (`InstanceSpec`, `HardwareConfig`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ecoserve import protocol as p
from ecoserve.config import CoordinatorConfig
from ecoserve.coordinator.policy import Policy, WorkerView
from ecoserve.coordinator.request import Request, RequestStatus as S
from ecoserve.coordinator.workers import ExpectedRank, WorkerRegistry
from ecoserve.data.workload import WorkloadRequest
from ecoserve.params import SLO, SamplingParams
from ecoserve.sim.instance import HardwareConfig, InstanceSpec, kv_bytes_per_token
from ecoserve.sim.lifecycle import NullCodec, SimLifecycle, TokenCount, lifecycle_leaks
from ecoserve.sim.worker import SimWorker
from ecoserve.sim.workloads import MAX_TOTAL_LEN

_STEP, _ARRIVAL, _TRANSFER, _SAMPLE = 0, 1, 2, 3  # event kinds
_NO_FIRST_TOKEN = (S.WAITING_PREFILL, S.PREFILLING)

__all__ = ["HardwareConfig", "InstanceSpec", "RequestResult", "SimResult", "Simulator", "kv_bytes_per_token"]
MAX_TOKENS_MODES = ("context", "trace")  # or a whole number: the same cap for every request




@dataclass
class RequestResult:
    arrival_s: float
    prompt_len: int
    output_len: int
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    finish_reason: str
    preemptions: int
    queue_ms: float = 0.0  # the coordinator's split of TTFT and the gap before decoding (RequestFinished)
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0


@dataclass
class SimResult:
    requests: list[RequestResult]
    duration_s: float  # simulated time until the last request ended
    counters: dict[str, float]
    kv_samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, used, reserved, capacity) decode side
    schedule_calls: int = 0
    events: int = 0
    worker_busy: dict[int, float] = field(default_factory=dict)  # rank -> busy share of the run
    stopped_early: bool = False  # more requests missed their SLOs than the allowance


class Simulator:
    """Run one workload through the coordinator policy on simulated instances."""

    def __init__(self, policy: Policy, instances: Sequence[InstanceSpec], hw: HardwareConfig | None = None,
                 sample_every_s: float = 1.0, max_tokens: str | int = "context",
                 context_len: int = MAX_TOTAL_LEN) -> None:
        """`max_tokens` is the cap each simulated client sends: "context" (the default) the
        context left after its prompt, `context_len - prompt` (`context_len`: OPT's 2,048, the
        length every bundled workload is cut to; less where the smallest decode or mixed pool
        holds fewer tokens, as the live front door refuses more); a whole number, that cap for every request;
        "trace" the request's own trace length (what a fidelity run's live client sends with
        ignore_eos, and how the simulator ran before caps: every policy then knows each length).
        Outputs run to their trace length, clipped to the cap."""
        if isinstance(max_tokens, bool) or not (max_tokens in MAX_TOKENS_MODES or (
                isinstance(max_tokens, int) and max_tokens >= 1)):
            raise ValueError(f"max_tokens must be one of {MAX_TOKENS_MODES} or a whole number >= 1, got {max_tokens!r}")
        if context_len < 2:
            raise ValueError(f"context_len must be >= 2 tokens, got {context_len}")
        self.max_tokens, self.context_len = max_tokens, context_len
        self.outputs_clipped = 0  # trace outputs longer than their cap, cut to it
        self.hw = hw or HardwareConfig()
        self.mixed_schedule = policy.mixed_schedule  # what the policy's mixed workers run (SimWorker)
        self.now = 0.0
        self.events: list[tuple[float, int, int, Any]] = []  # (time, tie, kind, payload)
        self.ties = itertools.count()
        self.dirty = False
        self.true_lengths: dict[str, int] = {}
        self.results: dict[str, RequestResult] = {}
        self.meta: dict[str, tuple[float, int, Request]] = {}
        self.sample_every_s = sample_every_s
        expected = [ExpectedRank(rank, s.role) for rank, s in enumerate(instances)]
        self.registry = WorkerRegistry(expected, "", heartbeat_timeout_s=1e18)
        self.workers: list[SimWorker] = []
        for rank, spec in enumerate(instances):
            kv = self.hw.kv_bytes_per_token or kv_bytes_per_token(spec.profile)
            blocks = spec.num_blocks or (spec.profile.max_num_tokens or 0) // self.hw.block_size
            if blocks < 1:
                raise ValueError(f"instance {rank} ({spec.profile.name}): no KV capacity; give num_blocks or a profile "
                                 "with max_num_tokens")
            w = SimWorker(self, rank, spec, self.hw, blocks, kv)
            self.workers.append(w)
            self.registry.views[rank] = WorkerView(
                rank, spec.role, blocks, self.hw.block_size, w.budget, blocks, kv_bytes_per_token=kv,
            )
            self.registry.last_seen[rank] = math.inf
        self.views = self.registry.views
        # What the live front door accepts (HelloReply.max_request_tokens): the context, and a whole
        # request within the smallest decode or mixed pool (deployments size pools over the context).
        self.max_request_tokens = min(self.context_len, self.registry.min_request_pool() * self.hw.block_size)
        self.lifecycle = SimLifecycle(
            policy, self.registry, NullCodec(), self._to_client, self._to_worker, CoordinatorConfig(),  # type: ignore[arg-type]
            clock=lambda: self.now,
        )
        self.lifecycle.trace_lengths = self.true_lengths  # for oracle predictors only
        self.extend_ahead = policy.extend_ahead
        self.schedule_calls = 0
        self.n_events = 0
        self.misses = 0  # requests certainly past their SLOs (this run)
        self.end_s = 0.0  # when the last request ended
        self.slo_ttft_ms: float | None = None
        self.slo_tpot_ms: float | None = None
        self.prompt_tokens: Sequence[Sequence[int]] | None = None
        self.kv_samples: list[tuple[float, int, int, int]] = []

    # --- plumbing ------------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.events, (t, next(self.ties), kind, payload))

    def _to_worker(self, rank: int, msg: Any) -> None:
        self.workers[rank].handle(msg)

    def to_coordinator(self, msg: Any) -> None:
        self.lifecycle.on_worker_message(msg)
        self.dirty = True

    def _to_client(self, client: bytes, msg: Any) -> None:
        if isinstance(msg, p.RequestFinished):
            arrival, prompt, req = self.meta.pop(msg.request_id)
            self.results[msg.request_id] = RequestResult(
                arrival, prompt, len(msg.token_ids), msg.ttft_ms, msg.tpot_ms, msg.e2e_ms, msg.finish_reason,
                req.num_preemptions, msg.queue_ms, msg.prefill_ms, msg.transfer_ms,
            )
            self.end_s = max(self.end_s, self.now)
            if (self.slo_ttft_ms is not None and msg.ttft_ms > self.slo_ttft_ms) or (
                    self.slo_tpot_ms is not None and msg.tpot_ms > self.slo_tpot_ms):
                self.misses += 1
        elif isinstance(msg, p.ErrorReply) and msg.request_id in self.meta:
            assert msg.request_id is not None
            arrival, prompt, _ = self.meta.pop(msg.request_id)
            self.results[msg.request_id] = RequestResult(arrival, prompt, 0, math.inf, math.inf, math.inf, "error", 0)
            self.misses += 1

    def start_step(self, w: SimWorker) -> None:
        seconds = w.start()
        if seconds is not None:
            w.busy = True
            heapq.heappush(self.events, (self.now + seconds, next(self.ties), _STEP, w))

    def try_transfer(self, rid: str) -> None:
        """Start moving `rid`'s KV once the sender holds it, has the order, and the receiver has posted."""
        req = self.lifecycle.requests.get(rid)
        if req is None or req.prefill_rank is None:
            return
        src = self.workers[req.prefill_rank]
        order = src.send_orders.get(rid)
        if order is None or rid not in src.held:
            return
        dst = self.workers[order.dst_rank]
        if rid not in dst.receiving:
            return
        del src.send_orders[rid]
        tokens = req.num_prompt_tokens
        start = max(self.now, src.link_free_at)
        end = start + tokens * src.link_s_per_token + src.link_latency_s
        src.link_free_at = end
        self._push(end, _TRANSFER, (src, dst, rid))

    # --- running -------------------------------------------------------------------------------------

    def run(self, workload: Iterable[WorkloadRequest], slo_ttft_ms: float | None = None,
            slo_tpot_ms: float | None = None, progress: Callable[[int], None] | None = None,
            max_sim_s: float = math.inf, miss_allowance: int | None = None,
            prompt_tokens: Sequence[Sequence[int]] | None = None) -> SimResult:
        """Run every request to its end. With `miss_allowance`, stop once more requests than that
        have certainly missed their SLOs (finished late, or still without a first token past
        their TTFT bound): the bisection then knows the attainment goal is out of reach.
        `prompt_tokens[i]`, when given, is request i's prompt (a predictor that reads the prompt
        needs it); otherwise prompts are placeholders of the right length."""
        self.prompt_tokens = prompt_tokens
        self.slo_ttft_ms, self.slo_tpot_ms = slo_ttft_ms, slo_tpot_ms
        self.misses = 0
        self.end_s = 0.0
        stopped = False
        # Arrivals are read in time order beside the event heap (which then holds only the
        # workers' few pending events, so each push and pop is cheap).
        arrivals = sorted(((item.arrival_s, i, item) for i, item in enumerate(workload)), key=lambda x: (x[0], x[1]))
        n = len(arrivals)
        if n and self.sample_every_s > 0:
            self._push(0.0, _SAMPLE, None)
        lc = self.lifecycle
        done_before = 0
        sampled = False
        nxt = 0
        inf = math.inf
        while self.events or nxt < n:
            t = min(self.events[0][0] if self.events else inf, arrivals[nxt][0] if nxt < n else inf)
            if t > max_sim_s:
                break
            self.now = t
            while nxt < n and arrivals[nxt][0] == t:
                _, i, item = arrivals[nxt]
                nxt += 1
                self.n_events += 1
                self._arrive(f"r{i}", item, slo_ttft_ms, slo_tpot_ms)
            while self.events and self.events[0][0] == t:
                _, _, kind, payload = heapq.heappop(self.events)
                self.n_events += 1
                if kind == _STEP:
                    payload.busy = False
                    payload.finish_step()
                    if payload.inbox:
                        payload.read_inbox()
                    if not payload.busy:
                        self.start_step(payload)
                elif kind == _TRANSFER:
                    src, dst, rid = payload
                    if rid in src.held:
                        src.free += src.held.pop(rid)
                        self.to_coordinator(p.TransferStatus(src.rank, rid, "done", ""))
                        src.kick()
                    dst.kv_arrived(rid)
                elif kind == _SAMPLE:
                    self._sample()
                    if miss_allowance is not None and slo_ttft_ms is not None:
                        late = sum(1 for r in lc.requests.values() if r.status in _NO_FIRST_TOKEN
                                   and (t - r.arrival) * 1e3 > slo_ttft_ms)
                        stopped = self.misses + late > miss_allowance
                    sampled = True
            if self.dirty:
                self.dirty = False
                # A round with every queue empty decides nothing (no policy acts without a waiting
                # prompt, KV, extension or resume), so it is skipped.
                if lc.waiting or lc.kv_waiting or lc.near_limit or lc.preempted:
                    for w in self.workers:
                        self.views[w.rank].free_blocks = w.free
                    self.schedule_calls += 1
                    lc.schedule()  # workers given work start their steps as they handle it
            if sampled:
                sampled = False
                if nxt < n or any(e[2] != _SAMPLE for e in self.events) or any(w.busy for w in self.workers):
                    self._push(t + self.sample_every_s, _SAMPLE, None)
                elif lc.requests:  # nothing can happen any more, yet requests are live: a bug
                    raise RuntimeError(self._stall_report())
            if miss_allowance is not None and self.misses > miss_allowance:
                stopped = True
            if stopped:
                break
            if progress is not None and len(self.results) != done_before:
                progress(len(self.results) - done_before)
                done_before = len(self.results)
        results = [self.results[f"r{i}"] for i in range(n) if f"r{i}" in self.results]
        busy = {w.rank: (w.busy_s / self.now if self.now else 0.0) for w in self.workers}
        counters = {k: float(v) for k, v in lc.counters.items()}
        counters["unfinished"] = float(n - len(results))
        counters["outputs_clipped"] = float(self.outputs_clipped)
        counters["mixed_steps"] = float(sum(w.n_mixed_steps for w in self.workers))  # prompt tokens beside decodes
        return SimResult(results, self.end_s, counters, self.kv_samples, self.schedule_calls, self.n_events, busy, stopped)

    def cap_for(self, prompt_len: int, output_len: int) -> int:
        """The `max_tokens` a simulated client sends (see `__init__`)."""
        if self.max_tokens == "trace":
            return output_len
        if self.max_tokens == "context":
            return max(1, self.max_request_tokens - prompt_len)
        assert isinstance(self.max_tokens, int)
        return self.max_tokens

    def _arrive(self, rid: str, w: WorkloadRequest, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> None:
        prompt = list(self.prompt_tokens[int(rid[1:])]) if self.prompt_tokens is not None else [1] * w.prompt_len
        cap = self.cap_for(w.prompt_len, w.output_len)
        # The client's cap with EOS ignored; the simulated worker ends it at its trace length.
        req = Request(
            request_id=rid, client=b"sim", client_request_id=rid, prompt_token_ids=prompt,
            params=SamplingParams(max_tokens=cap, temperature=0.0, ignore_eos=True), stream=False,
            slo=SLO(slo_ttft_ms, slo_tpot_ms), arrival=self.now,
            output_token_ids=TokenCount(),  # type: ignore[arg-type]
        )
        if w.output_len > cap:
            self.outputs_clipped += 1
        self.true_lengths[rid] = min(w.output_len, cap)
        self.meta[rid] = (w.arrival_s, w.prompt_len, req)
        self.lifecycle.admit(req)
        self.dirty = True

    def _stall_report(self) -> str:
        lc = self.lifecycle
        live = ", ".join(f"{r.request_id} {r.status.name} out={len(r.output_token_ids)} pred={r.predicted_tokens}"
                         for r in list(lc.requests.values())[:5])
        return (f"simulation stalled at t={self.now:.3f} s with {len(lc.requests)} requests live and no event left "
                f"(first: {live}); waiting {len(lc.waiting)}, near limit {len(lc.near_limit)}, preempted "
                f"{len(lc.preempted)}")

    def _sample(self) -> None:
        used = reserved = cap = 0
        for w in self.workers:
            if w.role == "prefill":
                continue
            used += w.used
            cap += w.num_blocks
            led = self.lifecycle.ledger.ranks.get(w.rank)
            reserved += (led.reserved_blocks if led else 0) + self.views[w.rank].reserved_blocks
        self.kv_samples.append((self.now, used, reserved, cap))

    def assert_no_leaks(self) -> None:
        problems = [f for w in self.workers for f in w.leaks()] + lifecycle_leaks(self.lifecycle)
        if problems:
            raise AssertionError("; ".join(problems))


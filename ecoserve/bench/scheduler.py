"""One scheduling round's decision time: `ecoserve bench scheduler`.

No sockets, no workers: the benchmark builds a `SchedulerState` directly, the way
`Lifecycle.schedule()` would, and times `policy.schedule(state)` alone. Decisions are not
applied, and `schedule()` does not change the state, so every round sees the same situation
without a reset (the benchmark checks this: every round's decisions must equal the first's).

Cluster (options change every number): 8 prefill + 8 decode workers for `distserve` and
`ecoserve`, 16 mixed workers for `vllm` and `orca`; each worker has 20,000 KV blocks of 16
tokens and a prefill token budget of 2,048 tokens per step.

State of one scenario:

- Q queued requests (Q = 1,000, 10,000, 100,000), in arrival order. Prompt and output lengths
  are drawn with replacement (seeded) from the bundled Azure 2023 conversation trace (prompt
  mean ~1,155 tokens, output mean ~211), or lognormal with the same means (`--lengths
  lognormal`). Every request has `max_tokens` 2,048 and no SLO. `ecoserve` predicts each
  length on admission (`on_admit`, the `oracle` predictor by default, so the RL buckets hold
  the real spread of lengths; `histogram` is warmed on 2,000 trace samples first).
- 1,000 running requests, decoding, spread round-robin over the decode (or mixed) workers.
  For `ecoserve` they sit in the reservation ledger as cohorts formed the way admission forms
  them (consecutive requests of one bucket, up to `queue_factor` x token budget prompt tokens),
  each started a few steps after it was reserved and partway through its horizon (none near
  its limit), with its Request in `state.requests`, DECODING (via PREFILLING and
  TRANSFERRING). For every policy the workers' `free_blocks` and `num_running` reflect the
  running requests' current KV, and for `orca` `reserved_blocks` holds prompt + `max_tokens`.
- Prefill workers are empty (nothing queued, every block free) and the decode pools have
  room for a few hundred more requests, so a round admits what the prefill queues take
  (`queue_factor` 2 x 2,048 tokens per worker): a few dozen requests. No prompt waits for a
  transfer, nothing is near its reservation or preempted: the round's work is admission.

Timing: `--warmup` untimed rounds, then `--rounds` rounds each timed with perf_counter_ns
around `policy.schedule(state)`. Reported per round: p50, p99 and mean in microseconds, and
requests admitted (dispatched to prefill). Before timing, the state is collected and frozen
out of the garbage collector (`gc.freeze()`), so a collection triggered in a timed round scans
only that round's own objects, not the 100k requests built for the scenario (as in a
long-running coordinator, where those requests would have aged into the oldest generation);
`--no-gc-freeze` leaves them in.

Group against one by one: `ecoserve` as configured (cohorts up to `max_cohort` 64, one
timeline check per cohort) against `ecoserve` with `max_cohort=1` (one timeline check per
request) on the same state: microseconds per round and per admitted request, and the ratio.

Target (reported, not asserted): p99 <= 1 ms per round for `ecoserve` at 10,000 queued.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ecoserve.report import print_table, write_json
from ecoserve.coordinator.ledger import ReservationLedger
from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.policy import Decisions, FIFOQueue, Policy, SchedulerState, WorkerView
from ecoserve.coordinator.request import Request, RequestStatus
from ecoserve.params import SamplingParams

POLICY_NAMES = ("ecoserve", "distserve", "vllm", "orca")
TARGET_P99_US = 1000.0
TARGET_QUEUED = 10_000
SINGLE = "ecoserve/one-by-one"  # ecoserve with max_cohort=1
NOW_STEP = 100_000  # decode steps each decode worker has reported (the ledger's clock)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [v for v in text.replace(" ", "").split(",") if v]
    bad = sorted(set(names) - set(POLICY_NAMES))
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown policies {bad}; choose from {list(POLICY_NAMES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queued", type=_int_list, default=[1000, 10_000, 100_000],
                        help="queued requests, comma-separated")
    parser.add_argument("--running", type=int, default=1000, help="requests decoding")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds per policy and queue size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--policies", type=_name_list, default=list(POLICY_NAMES), help="comma-separated")
    parser.add_argument("--prefill", type=int, default=8, help="prefill workers (distserve, ecoserve)")
    parser.add_argument("--decode", type=int, default=8, help="decode workers (distserve, ecoserve)")
    parser.add_argument("--mixed", type=int, default=16, help="mixed workers (vllm, orca)")
    parser.add_argument("--num-blocks", type=int, default=20_000, help="KV blocks per worker")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=2048, help="prefill tokens per step per worker")
    parser.add_argument("--max-tokens", type=int, default=2048, help="every request's max_tokens")
    parser.add_argument("--lengths", choices=["azure", "lognormal"], default="azure",
                        help="prompt/output lengths: sampled from the Azure conversation trace, or lognormal")
    parser.add_argument("--predictor", choices=["oracle", "oracle-noisy", "histogram"], default="oracle",
                        help="ecoserve's length predictor")
    parser.add_argument("--max-cohort", type=int, default=64, help="ecoserve's largest cohort (the group side)")
    parser.add_argument("--no-gc-freeze", action="store_true", help="leave the scenario's objects in the collector")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")


@dataclass(frozen=True)
class Cluster:
    prefill: int
    decode: int
    mixed: int
    num_blocks: int
    block_size: int
    token_budget: int

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


# --- workload -------------------------------------------------------------------------------------


def _lengths(kind: str, n: int, max_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if kind == "azure":
        prompts, outputs = _azure_conv()
        idx = rng.integers(0, len(prompts), n)
        p, o = prompts[idx], outputs[idx]
    else:  # lognormal with the trace's means, sigma 0.8 in log space
        sigma = 0.8
        p = np.rint(rng.lognormal(np.log(1155) - sigma**2 / 2, sigma, n))
        o = np.rint(rng.lognormal(np.log(211) - sigma**2 / 2, sigma, n))
    return np.maximum(1, p).astype(int), np.clip(o, 1, max_tokens).astype(int)


@functools.lru_cache(maxsize=1)
def _azure_conv() -> tuple[np.ndarray, np.ndarray]:
    from ecoserve.data.azure import load_azure_trace

    trace = load_azure_trace("conv")
    return np.array([r.prompt_len for r in trace]), np.array([r.output_len for r in trace])


class _Prompts:
    """Prompt token lists shared by length: policies only read their length, and 100k distinct
    lists of ~1,000 tokens would take gigabytes."""

    def __init__(self) -> None:
        self._lists: dict[int, list[int]] = {}

    def __call__(self, n: int) -> list[int]:
        ids = self._lists.get(n)
        if ids is None:
            ids = self._lists[n] = [1] * n
        return ids


def _request(rid: str, prompt: list[int], max_tokens: int, arrival: float) -> Request:
    return Request(
        request_id=rid, client=b"bench", client_request_id=rid, prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0), stream=False, arrival=arrival,
    )


@dataclass
class Scenario:
    """Everything a round reads, for every policy of one queue size (requests are shared)."""

    queued: list[Request]
    running: list[Request]
    pd_workers: dict[int, WorkerView]  # ecoserve: prefill + decode, with the ledger's running requests
    ds_workers: dict[int, WorkerView]  # distserve: the same ranks and loads
    mixed_workers: dict[int, WorkerView]  # vllm, orca
    ledger: ReservationLedger
    requests: dict[str, Request]
    ecoserve_queue: FIFOQueue
    fifo_queue: FIFOQueue


def build_scenario(
    num_queued: int, num_running: int, cluster: Cluster, max_tokens: int, lengths: str, policy: Policy, seed: int
) -> Scenario:
    """Build the state once; `policy` is the ecoserve policy whose predictions fill the buckets
    (its `on_admit` runs on every request, queued or running)."""
    rng = np.random.default_rng([seed, num_queued, num_running])
    n = num_queued + num_running
    prompts, outputs = _lengths(lengths, n, max_tokens, rng)
    shared = _Prompts()
    now = time.monotonic()
    running = [
        _request(f"run-{i}", shared(int(prompts[i])), max_tokens, now - 60.0 + i * 1e-3) for i in range(num_running)
    ]
    queued = [
        _request(f"q-{i}", shared(int(prompts[num_running + i])), max_tokens, now - 1.0 + i * 1e-6)
        for i in range(num_queued)
    ]
    true_lengths = {r.request_id: int(n) for r, n in zip(running + queued, outputs)}
    if policy.predictor is not None and policy.predictor.oracle:
        policy.predictor.bind(true_lengths.get)  # as the simulator's lifecycle would
    for req in running + queued:
        policy.on_admit(req)  # the predicted bucket (the baselines never look at it)
    ecoserve_queue, fifo_queue = policy.new_queue(), FIFOQueue()
    for req in queued:
        ecoserve_queue.push(req)
        fifo_queue.push(req)

    c = cluster
    prefill_ranks = list(range(c.prefill))
    decode_ranks = list(range(c.prefill, c.prefill + c.decode))
    ledger = ReservationLedger(policy.start_delay)
    kv_blocks = {r: 0 for r in decode_ranks}
    count = {r: 0 for r in decode_ranks}
    # Running cohorts, formed as admission forms them: consecutive requests of one bucket, up to
    # queue_factor x token budget prompt tokens; each on the next decode worker in turn.
    room = getattr(getattr(policy, "config", None), "queue_factor", 2.0) * c.token_budget
    by_bucket: dict[int, list[Request]] = {}
    for req in running:
        assert req.predicted_tokens is not None
        by_bucket.setdefault(req.predicted_tokens, []).append(req)
    cohorts: list[tuple[int, list[Request]]] = []
    for bucket, reqs in by_bucket.items():
        group: list[Request] = []
        tokens = 0
        for req in reqs:
            if group and tokens + req.num_prompt_tokens > room:
                cohorts.append((bucket, group))
                group, tokens = [], 0
            group.append(req)
            tokens += req.num_prompt_tokens
        if group:
            cohorts.append((bucket, group))
    ahead = policy.extend_ahead
    for k, (horizon, members) in enumerate(cohorts):
        rank = decode_ranks[k % len(decode_ranks)]
        # Partway through: below every member's true length (none finished) and not near the horizon.
        limit = min(min(true_lengths[r.request_id] for r in members), horizon - ahead)
        produced = int(rng.integers(0, max(1, limit)))
        start = NOW_STEP - produced
        ledger.add(rank, c.block_size, horizon, [(r.request_id, r.num_prompt_tokens) for r in members],
                   start - int(rng.integers(1, 9)))
        for req in members:
            ledger.started(req.request_id, start)
            req.transition(RequestStatus.PREFILLING, now - 30.0)
            req.transition(RequestStatus.TRANSFERRING, now - 29.0)
            req.transition(RequestStatus.DECODING, now - 28.9)
            req.prefill_rank = prefill_ranks[k % len(prefill_ranks)]
            req.decode_rank = rank
            req.decode_start_step = start
            req.output_token_ids = [1] * (produced + 1)  # the prefill's first token, then `produced`
            kv_blocks[rank] += c.blocks(req.num_prompt_tokens + produced + 1)
            count[rank] += 1

    def view(rank: int, role: str, used: int = 0, running_here: int = 0, reserved: int = 0) -> WorkerView:
        if used > c.num_blocks:
            raise ValueError(f"{num_running} running requests need {used} blocks on rank {rank} of "
                             f"{c.num_blocks}: raise --num-blocks or lower --running")
        return WorkerView(rank, role, c.num_blocks, c.block_size, c.token_budget, c.num_blocks - used,
                          reserved_blocks=reserved, num_running=running_here, decode_steps=NOW_STEP)

    pd = {r: view(r, "prefill") for r in prefill_ranks}
    pd.update({r: view(r, "decode", kv_blocks[r], count[r]) for r in decode_ranks})
    ds = {r: view(r, "prefill") for r in prefill_ranks}
    ds.update({r: view(r, "decode", kv_blocks[r], count[r]) for r in decode_ranks})

    used = dict.fromkeys(range(c.mixed), 0)
    reserved = dict.fromkeys(range(c.mixed), 0)
    held = dict.fromkeys(range(c.mixed), 0)
    for i, req in enumerate(running):
        rank = i % c.mixed
        used[rank] += c.blocks(req.num_prompt_tokens + len(req.output_token_ids))
        reserved[rank] += c.blocks(req.num_prompt_tokens + req.max_tokens)  # orca's reservation
        held[rank] += 1
    mixed = {r: view(r, "mixed", used[r], held[r], reserved[r]) for r in range(c.mixed)}
    requests = {req.request_id: req for req in running + queued}
    return Scenario(queued, running, pd, ds, mixed, ledger, requests, ecoserve_queue, fifo_queue)


def state_for(name: str, sc: Scenario) -> SchedulerState:
    now = time.monotonic()
    if name.startswith("ecoserve"):
        return SchedulerState(now, sc.ecoserve_queue, deque(), sc.pd_workers, sc.ledger, {}, {}, sc.requests)
    workers = sc.ds_workers if name == "distserve" else sc.mixed_workers
    return SchedulerState(now, sc.fifo_queue, deque(), workers, ReservationLedger(), {}, {}, sc.requests)


# --- timing -----------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def time_rounds(policy: Policy, state: SchedulerState, rounds: int, warmup: int) -> tuple[list[float], Decisions]:
    """Per-round microseconds of `policy.schedule(state)`; the same decisions every round."""
    first = policy.schedule(state)
    for _ in range(max(0, warmup - 1)):
        policy.schedule(state)
    times: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        out = policy.schedule(state)
        t1 = clock()
        times.append((t1 - t0) / 1e3)
        if out != first:
            raise AssertionError(f"{policy.name}: a round changed the state (its decisions differ from the first)")
    return times, first


def _summarise(name: str, queued: int, running: int, times: list[float], out: Decisions) -> dict[str, Any]:
    admitted = len(out.prefills)
    mean = statistics.fmean(times)
    return {
        "policy": name,
        "queued": queued,
        "running": running,
        "rounds": len(times),
        "p50_us": _percentile(times, 50),
        "p99_us": _percentile(times, 99),
        "mean_us": mean,
        "max_us": max(times),
        "admitted_per_round": admitted,
        "cohorts_per_round": len(out.reservations),
        "us_per_admitted": mean / admitted if admitted else None,
    }


def run_benchmark(
    queued: Sequence[int], running: int, rounds: int, warmup: int = 5, policies: Sequence[str] = POLICY_NAMES,
    cluster: Cluster | None = None, max_tokens: int = 2048, lengths: str = "azure", predictor: str = "oracle",
    max_cohort: int = 64, gc_freeze: bool = True, seed: int = 0,
) -> dict[str, Any]:
    """Time every policy at every queue size; returns {"results": [...], "group_vs_single": [...]}."""
    if rounds < 1 or running < 0:
        raise ValueError(f"need rounds >= 1 and running >= 0, got {rounds} and {running}")
    c = cluster or Cluster(8, 8, 16, 20_000, 16, 2048)
    if min(c.prefill, c.decode, c.mixed) < 1:
        raise ValueError("need at least one prefill, one decode and one mixed worker")
    results: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []
    for q in queued:
        eco_opts: dict[str, Any] = {"predictor": predictor, "max_cohort": max_cohort}
        if predictor == "oracle-noisy":
            eco_opts["predictor_options"] = {"seed": seed}
        made: dict[str, Policy] = {}
        for name in policies:
            made[name] = make_policy(name, **eco_opts) if name == "ecoserve" else make_policy(name)
        if "ecoserve" in policies:
            made[SINGLE] = make_policy("ecoserve", **(eco_opts | {"max_cohort": 1}))
        base = made.get("ecoserve") or make_policy("ecoserve", **eco_opts)
        if predictor == "histogram":
            _warm_histogram(base, lengths, max_tokens, seed)  # only `base` predicts (on_admit)
        sc = build_scenario(q, running, c, max_tokens, lengths, base, seed)
        if gc_freeze:
            gc.collect()
            gc.freeze()
        try:
            rows: dict[str, dict[str, Any]] = {}
            for name, policy in made.items():
                times, out = time_rounds(policy, state_for(name, sc), rounds, warmup)
                rows[name] = _summarise(name, q, running, times, out)
                tokens = sum(sc.requests[d.request_id].num_prompt_tokens for d in out.prefills)
                rows[name]["admitted_prompt_tokens"] = tokens
        finally:
            if gc_freeze:
                gc.unfreeze()
        results.extend(r for name, r in rows.items() if name != SINGLE)
        if SINGLE in rows:
            g, s = rows["ecoserve"], rows[SINGLE]
            per_g, per_s = g["us_per_admitted"], s["us_per_admitted"]
            ratio = per_s / per_g if per_g and per_s else None
            group.append({
                "queued": q, "running": running, "group": g, "single": s,
                "single_over_group_per_request": ratio,
                "single_over_group_per_round": s["mean_us"] / g["mean_us"],
            })
        del sc
    return {"results": results, "group_vs_single": group}


def _warm_histogram(policy: Policy, lengths: str, max_tokens: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 7])
    prompts, outputs = _lengths(lengths, 2000, max_tokens, rng)
    assert policy.predictor is not None
    for p, o in zip(prompts, outputs):
        policy.predictor.observe(int(p), int(o))


# --- the command --------------------------------------------------------------------------------


def _opt(v: float | None) -> float | str:
    return "-" if v is None else v


def run_scheduler_benchmark(args: argparse.Namespace) -> int:
    cluster = Cluster(args.prefill, args.decode, args.mixed, args.num_blocks, args.block_size, args.token_budget)
    doc = run_benchmark(
        args.queued, args.running, args.rounds, args.warmup, args.policies, cluster, args.max_tokens, args.lengths,
        args.predictor, args.max_cohort, not args.no_gc_freeze, args.seed,
    )
    results, group = doc["results"], doc["group_vs_single"]
    print_table(
        f"One scheduling round, {args.running} running, {args.rounds} rounds "
        f"({args.prefill}P+{args.decode}D or {args.mixed} mixed workers)",
        ["policy", "queued", "p50 us", "p99 us", "mean us", "adm/round", "us/adm"],
        [(r["policy"], r["queued"], r["p50_us"], r["p99_us"], r["mean_us"], r["admitted_per_round"],
          _opt(r["us_per_admitted"])) for r in results],
    )
    if group:
        rows: list[tuple[Any, ...]] = []
        for g in group:
            variants = (("group", g["group"], None), ("1-by-1", g["single"], g["single_over_group_per_request"]))
            for label, r, ratio in variants:
                rows.append((g["queued"], label, r["p99_us"], r["mean_us"], r["admitted_per_round"],
                             r["cohorts_per_round"], _opt(r["us_per_admitted"]), _opt(ratio)))
        print_table(
            f"ecoserve admission: bucket groups (max_cohort {args.max_cohort}) vs one by one (max_cohort 1)",
            ["queued", "admission", "p99 us", "mean us", "adm/round", "cohorts", "us/adm", "x us/adm"], rows,
        )
    summary = _summary(results, group)
    target = summary.get("ecoserve_target_met")
    if target is not None:
        print(f"target: ecoserve p99 <= {TARGET_P99_US:.0f} us per round at {TARGET_QUEUED} queued: "
              f"{'met' if target else 'NOT met'} ({summary['ecoserve_10000_p99_us']:.1f} us)")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        settings["gc_freeze"] = not settings.pop("no_gc_freeze")
        write_json(args.out, summary, settings, **doc)
    return 0


def _summary(results: list[dict[str, Any]], group: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for r in results:
        key = f"{r['policy']}_{r['queued']}"
        for field in ("p50_us", "p99_us", "mean_us", "admitted_per_round"):
            summary[f"{key}_{field}"] = r[field]
    for g in group:
        q = g["queued"]
        summary[f"group_{q}_us_per_request"] = g["group"]["us_per_admitted"]
        summary[f"single_{q}_us_per_request"] = g["single"]["us_per_admitted"]
        summary[f"single_{q}_mean_us"] = g["single"]["mean_us"]
        summary[f"single_{q}_admitted_per_round"] = g["single"]["admitted_per_round"]
        summary[f"single_over_group_{q}"] = g["single_over_group_per_request"]
    if f"ecoserve_{TARGET_QUEUED}_p99_us" in summary:
        summary["ecoserve_target_p99_us"] = TARGET_P99_US
        summary["ecoserve_target_met"] = summary[f"ecoserve_{TARGET_QUEUED}_p99_us"] <= TARGET_P99_US
    return summary

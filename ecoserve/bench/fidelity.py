"""`ecoserve bench sim-fidelity`: how well the discrete-event simulator predicts the real
cluster on this machine.

    ecoserve bench sim-fidelity --model smollm2-135m --policy distserve --workload azure-conv \\
        --num-requests 40 --rate 0.25 --prefill 1 --decode 1 --out out/sim_fidelity.json

1. Profile: a latency profile fitted from our engine (`--profile`, default the bundled CPU
   profile of SmolLM2-135M; `--fit` measures a fresh one first, as `ecoserve profile` does).
2. Requests: the first `--num-requests` of the workload whose prompts lie within the
   profile's measured range (`--max-prompt-len`, default its token budget: longer prompts are
   under-predicted by the fit), outputs clipped to `--max-output-len`, Poisson arrivals at
   `--rate` (seeded). The one list serves both sides.
3. Real: `ecoserve serve` with the worker settings the simulator is given (KV blocks, token
   budget, torch threads, policy and its options), warmed up by two untimed requests; then the
   open-loop driver of `bench serve` sends each request at its arrival time (token-id prompts
   of its length, its output forced with ignore_eos) and times TTFT and TPOT at the client.
4. Simulated: the same list through `sim.Simulator`: the same policy and options, one instance
   per worker with the profile, the same pool and token budget; a KV transfer costs bytes /
   link rate + latency, the gloo figures `bench kv-transfer` measured on this machine.
5. The table: TTFT and TPOT p50/p90 and mean JCT, measured against simulated, each error and
   whether it is within `--tolerance`; JSON with the same `summary`, both sides' requests, and
   where the real time went: each process's CPU time and its wait for a CPU (schedstat),
   against the simulated busy time. The simulator gives each worker a core of its own; on a
   shared machine the workers wait for one, so a second simulation with each worker's profile
   stretched by its measured wait is reported beside the first: a diagnosis, not a prediction.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ecoserve.bench import fidelity_report as rep
from ecoserve.data.workload import WorkloadRequest

BUNDLED = {"smollm2-135m": "cpu-smollm2-135m.json"}  # --model -> bundled profile file
# Paged gloo transfer between two ranks of this machine (`bench kv-transfer`, README): 18.3 ms
# for 23.6 MB (512 tokens of SmolLM2-135M KV), 65.7 ms for 188.7 MB (4,096): a line through
# both gives 3.5 GB/s and 11.5 ms of fixed cost (60 messages, one per layer and K/V).
LINK_GBS, LINK_LATENCY_MS = 3.5, 11.5
POLICIES = ("distserve", "ecoserve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ecoserve.sim.workloads import WORKLOADS

    p.add_argument("--model", default="smollm2-135m", help="built-in name or local Hugging Face folder")
    p.add_argument("--profile", default=None, help="a profile .json (default: the bundled one of --model)")
    p.add_argument("--fit", action="store_true", help="fit a fresh profile of --model first (ecoserve profile)")
    p.add_argument("--quick", action="store_true", help="with --fit: profile's quick grid (tests)")
    p.add_argument("--fit-out", default=None, help="with --fit: where to write it (default: beside --out)")
    p.add_argument("--policy", default="distserve", choices=POLICIES)
    p.add_argument("--predictor", default="oracle", help="--policy ecoserve: the length predictor, on both sides")
    p.add_argument("--workload", default="azure-conv", choices=WORKLOADS)
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=0.25, help="Poisson arrivals, requests/s")
    p.add_argument("--max-prompt-len", type=int, default=None,
                   help="keep requests with prompts up to this (default: the profile's token budget)")
    p.add_argument("--max-output-len", type=int, default=256, help="clip outputs to this")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: the profile's pool)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per prefill step (default: the profile's token budget)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch threads (default: the profile's)")
    p.add_argument("--link-gbs", type=float, default=LINK_GBS, help="KV transfer rate in the simulator (GB/s)")
    p.add_argument("--link-latency-ms", type=float, default=LINK_LATENCY_MS, help="fixed cost of one KV transfer")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO carried by every request, both sides")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO carried by every request, both sides")
    p.add_argument("--tolerance", type=float, default=0.2, help="the error a figure may have (0.2: 20%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")


@dataclass(frozen=True)
class Settings:
    """What both sides are given."""

    model: str
    profile: str  # the profile file
    dtype: str
    policy: str
    options: dict[str, Any]  # the policy's options, on both sides
    workload: str
    num_requests: int
    rate: float
    max_prompt_len: int
    max_output_len: int
    prefill: int
    decode: int
    block_size: int
    num_blocks: int
    token_budget: int
    threads: int
    link_bytes_per_s: float
    link_latency_s: float
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    tolerance: float
    seed: int
    server_args: list[str] = field(default_factory=list)


def _profile_path(args: argparse.Namespace) -> str:
    if args.fit:
        return _fit_profile(args)
    if args.profile:
        return str(args.profile)
    if args.model not in BUNDLED:
        raise ValueError(f"no bundled profile for {args.model!r} (bundled: {', '.join(BUNDLED)}); give --profile "
                         "FILE.json or --fit")
    return str(resources.files("ecoserve.data").joinpath("profiles", BUNDLED[args.model]))


def _fit_profile(args: argparse.Namespace) -> str:
    """`ecoserve profile` in this process, with the pool and threads the cluster will get."""
    from ecoserve.bench import profile

    out = args.fit_out or (str(Path(args.out).with_suffix("")) + ".profile.json" if args.out else "out/sim_fidelity.profile.json")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    profile.add_arguments(parser)
    argv = ["--model", args.model, "--out", out, "--threads", str(args.threads_per_worker or 1)]
    argv += ["--quick"] if args.quick else []
    argv += ["--max-len", str(args.max_prompt_len)] if args.max_prompt_len and not args.quick else []
    argv += ["--num-blocks", str(args.num_blocks)] if args.num_blocks else []
    fit_args = parser.parse_args(argv)
    fit_args.command = "profile"
    profile.run_profile(fit_args)
    return out


def settings_from(args: argparse.Namespace) -> Settings:
    for name in ("num_requests", "max_output_len", "prefill", "decode"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.rate > 0 or args.rate == float("inf"):
        raise ValueError(f"--rate must be a finite number of requests/s > 0, got {args.rate}")
    if not (args.link_gbs > 0 and args.link_latency_ms >= 0 and 0 < args.tolerance < 1):
        raise ValueError("need --link-gbs > 0, --link-latency-ms >= 0 and 0 < --tolerance < 1")
    path = _profile_path(args)
    from ecoserve.sim.latency import load_profile

    prof = load_profile(path)
    doc = json.loads(Path(path).read_text())
    fitted_on = doc.get("model")
    if fitted_on and fitted_on != args.model:
        raise ValueError(f"profile {path} was fitted on {fitted_on!r}, not {args.model!r}: give --model {fitted_on}, "
                         "another --profile, or --fit")
    if not prof.kv_bytes_per_token:
        raise ValueError(f"profile {path} lacks kv_bytes_per_token; fit one with `ecoserve profile` (or --fit)")
    measured = dict(doc.get("settings", {}))
    budget = args.max_num_batched_tokens or int(doc.get("token_budget", 512))
    num_blocks = args.num_blocks or int(doc.get("num_blocks") or (prof.max_num_tokens or 0) // doc.get("block_size", 16))
    if num_blocks < 1:
        raise ValueError(f"profile {path} gives no KV pool size; give --num-blocks")
    options: dict[str, Any] = {}
    server_args = ["--policy", args.policy]
    if args.policy == "ecoserve":
        costs = {"decode": list(prof.decode_small), "prefill": list(prof.prefill),
                 "kv_bytes_per_token": prof.kv_bytes_per_token, "swap_bytes_per_s": 8e9}
        options = {"predictor": args.predictor, "costs": costs}
        server_args += ["--predictor", args.predictor, "--policy-option", "costs=" + json.dumps(costs)]
    return Settings(
        model=args.model, profile=path, dtype=str(doc.get("dtype", "float32")), policy=args.policy, options=options,
        workload=args.workload, num_requests=args.num_requests, rate=args.rate,
        max_prompt_len=args.max_prompt_len or budget, max_output_len=args.max_output_len,
        prefill=args.prefill, decode=args.decode, block_size=int(doc.get("block_size", 16)), num_blocks=num_blocks,
        token_budget=budget, threads=args.threads_per_worker or int(measured.get("threads") or 1),
        link_bytes_per_s=args.link_gbs * 1e9, link_latency_s=args.link_latency_ms / 1e3,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, tolerance=args.tolerance, seed=args.seed,
        server_args=server_args,
    )


def build_requests(s: Settings) -> list[WorkloadRequest]:
    """The first `num_requests` of the workload with prompts <= max_prompt_len, outputs clipped,
    Poisson arrivals at `rate`."""
    from ecoserve.data.synthetic import with_arrivals
    from ecoserve.sim.workloads import make_workload

    pool = make_workload(s.workload, max(1000, 20 * s.num_requests), 1.0, s.seed)  # lengths; arrivals redrawn
    kept = [dataclasses.replace(r, output_len=min(r.output_len, s.max_output_len))
            for r in pool if r.prompt_len <= s.max_prompt_len][: s.num_requests]
    if len(kept) < s.num_requests:
        raise ValueError(f"only {len(kept)} {s.workload} requests have prompts <= {s.max_prompt_len} tokens; "
                         "ask for fewer or raise --max-prompt-len")
    return with_arrivals(kept, s.rate, seed=s.seed)


# --- the two sides ------------------------------------------------------------------------------


@dataclass
class RealRun:
    result: Any  # serve_metrics.BenchResult
    wall_s: float
    cpu: dict[str, rep.CPUTime]  # process name -> CPU time over the timed replay
    load_before: list[float]
    load_after: list[float]


def run_real(s: Settings, requests: list[WorkloadRequest], progress: bool) -> RealRun:
    from ecoserve.bench.cluster import local_cluster

    extra = [*s.server_args, "--num-blocks", str(s.num_blocks), "--block-size", str(s.block_size),
             "--max-num-batched-tokens", str(s.token_budget), "--threads-per-worker", str(s.threads)]
    with local_cluster(s.model, s.prefill, s.decode, 0, *extra, dtype=s.dtype, device="cpu") as addr:
        return asyncio.run(_replay(addr, s, requests, progress))


async def _replay(addr: str, s: Settings, requests: list[WorkloadRequest], progress: bool) -> RealRun:
    from ecoserve.bench.cluster import child_pids
    from ecoserve.bench.serve import connect, run_benchmark
    from ecoserve.client_types import SLO

    client = await connect(addr)
    stats = await client.stats(timeout=10.0)
    await client.close()
    roles = ["prefill"] * s.prefill + ["decode"] * s.decode
    pids = {f"{role} rank {r}": int(stats[f"rank{r}.pid"]) for r, role in enumerate(roles) if f"rank{r}.pid" in stats}
    serve = [pid for pid in child_pids(os.getpid()) if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    pids |= {"coordinator": pid for pid in serve[:1]}
    # Untimed: first calls of every path (allocator, thread pools), a short and a long prompt.
    warm = [WorkloadRequest(0.0, 16, 4), WorkloadRequest(0.0, s.max_prompt_len, 4)]
    await run_benchmark(addr, warm, progress=False)
    before = {name: rep.cpu_time(pid) for name, pid in pids.items()}
    client_before, load_before, t0 = time.process_time(), rep.load_average(), time.perf_counter()
    result = await run_benchmark(addr, requests, SLO(s.slo_ttft_ms, s.slo_tpot_ms), seed=s.seed, progress=progress)
    wall = time.perf_counter() - t0
    cpu = {}
    for name, pid in pids.items():
        now, then = rep.cpu_time(pid), before[name]
        if now is not None and then is not None:
            cpu[name] = now - then
    used = time.process_time() - client_before
    cpu["client (this process)"] = rep.CPUTime(used, 0.0, used, 0.0)  # no schedstat wait for our own threads here
    return RealRun(result, wall, cpu, load_before, rep.load_average())


def run_sim(s: Settings, requests: list[WorkloadRequest], stretch: dict[str, float] | None = None) -> tuple[Any, Any]:
    """(SimResult, Simulator) of `requests`; `stretch` multiplies each role's step times."""
    from ecoserve.coordinator.policies import make_policy
    from ecoserve.sim.latency import load_profile
    from ecoserve.sim.simulator import HardwareConfig, InstanceSpec, Simulator

    prof = load_profile(s.profile)

    def scaled(role: str) -> Any:
        k = (stretch or {}).get(role, 1.0)
        if k == 1.0:
            return prof
        return dataclasses.replace(prof, name=f"{prof.name} x{k:.2f}", prefill=_times(prof.prefill, k),
                                   decode_small=_times(prof.decode_small, k), decode_large=_times(prof.decode_large, k))

    hw = HardwareConfig(
        block_size=s.block_size, prefill_token_budget=s.token_budget, mixed_token_budget=s.token_budget,
        link_bytes_per_s=s.link_bytes_per_s, link_latency_s=s.link_latency_s,
        host_blocks_factor=0.0,  # the server runs with no host swap space (--num-host-blocks 0)
        kv_bytes_per_token=prof.kv_bytes_per_token or 0,
    )
    specs = [InstanceSpec("prefill", scaled("prefill"), 1, s.num_blocks)] * s.prefill
    specs += [InstanceSpec("decode", scaled("decode"), 1, s.num_blocks)] * s.decode
    sim = Simulator(make_policy(s.policy, **s.options), specs, hw)
    return sim.run(requests, s.slo_ttft_ms, s.slo_tpot_ms), sim


def _times(coeffs: tuple[float, float, float], k: float) -> tuple[float, float, float]:
    return (coeffs[0] * k, coeffs[1] * k, coeffs[2] * k)


# --- the command --------------------------------------------------------------------------------


def _measured(result: Any) -> rep.Latencies:
    ok = [r for r in result.requests if r.status == "ok" and r.token_times]
    return rep.Latencies([r.ttft_ms for r in ok], [r.tpot_ms for r in ok], [r.e2e_ms for r in ok])


def _simulated(res: Any) -> rep.Latencies:
    done = [r for r in res.requests if r.finish_reason != "error"]
    return rep.Latencies([r.ttft_ms for r in done], [r.tpot_ms if r.output_len > 1 else None for r in done],
                         [r.e2e_ms for r in done])


def same_requests(requests: list[WorkloadRequest], result: Any, res: Any) -> bool:
    """Both sides ran every request, with its arrival time, prompt and output length."""
    real, sim = sorted(result.requests, key=lambda r: r.index), res.requests
    if len(real) != len(requests) or len(sim) != len(requests):
        return False
    base = requests[0].arrival_s
    for i, (want, m, x) in enumerate(zip(requests, real, sim)):
        if m.index != i or m.status != "ok" or (m.prompt_len, m.num_output_tokens) != (want.prompt_len, want.output_len):
            return False
        if (x.prompt_len, x.output_len) != (want.prompt_len, want.output_len):
            return False
        if abs(m.arrival_s - (want.arrival_s - base)) > 1e-6 or abs(x.arrival_s - want.arrival_s) > 1e-6:
            return False
    return True


def _stretch(cpu: dict[str, rep.CPUTime], role: str) -> float:
    parts = [c for name, c in cpu.items() if name.startswith(f"{role} rank")]
    run = sum(c.main_run_s for c in parts)
    return (run + sum(c.main_wait_s for c in parts)) / run if run > 0 else 1.0


def _request_rows(requests: list[WorkloadRequest], result: Any, res: Any) -> list[dict[str, Any]]:
    sim = {round(r.arrival_s, 9): r for r in res.requests}  # arrivals are distinct draws
    out = []
    for i, (want, m) in enumerate(zip(requests, sorted(result.requests, key=lambda r: r.index))):
        x = sim.get(round(want.arrival_s, 9))
        out.append({
            "index": i, "arrival_s": want.arrival_s, "prompt_len": want.prompt_len, "output_len": want.output_len,
            "measured": {"status": m.status, "ttft_ms": m.ttft_ms, "tpot_ms": m.tpot_ms, "e2e_ms": m.e2e_ms,
                         "queue_ms": m.server_queue_ms, "prefill_ms": m.server_prefill_ms,
                         "transfer_ms": m.server_transfer_ms, "output_tokens": m.num_output_tokens},
            "simulated": None if x is None else {
                "ttft_ms": x.ttft_ms, "tpot_ms": x.tpot_ms, "e2e_ms": x.e2e_ms, "queue_ms": x.queue_ms,
                "prefill_ms": x.prefill_ms, "transfer_ms": x.transfer_ms, "output_tokens": x.output_len},
        })
    return out


def run_fidelity(args: argparse.Namespace) -> int:
    """Exit 0 when both sides ran every request (whatever the errors), 1 otherwise."""
    from ecoserve.bench.report import write_json
    from ecoserve.bench.serve_metrics import summarize
    from ecoserve.data.workload import arrival_span_s

    start = time.perf_counter()
    s = settings_from(args)
    requests = build_requests(s)
    print(f"{len(requests)} {s.workload} requests (prompts <= {s.max_prompt_len} tokens, outputs clipped to "
          f"{s.max_output_len}), Poisson {s.rate:g} req/s over {arrival_span_s(requests):.0f} s; {s.policy}, "
          f"{s.prefill} prefill + {s.decode} decode, {s.num_blocks} KV blocks and {s.threads} torch thread(s) per "
          f"worker, token budget {s.token_budget}; profile {s.profile}", flush=True)
    real = run_real(s, requests, progress=not args.no_progress)
    res, sim = run_sim(s, requests)
    same = same_requests(requests, real.result, res)
    rows = rep.compare(_measured(real.result), _simulated(res))
    stretch = {role: _stretch(real.cpu, role) for role in ("prefill", "decode")}
    adj_res, _ = run_sim(s, requests, stretch)
    adj_rows = rep.compare(_measured(real.result), _simulated(adj_res))

    cpu = {name: {"run_s": c.main_run_s, "wait_s": c.main_wait_s, "stretch": c.stretch, "all_threads_run_s": c.all_run_s,
                  "all_threads_wait_s": c.all_wait_s} for name, c in real.cpu.items()}
    for w in sim.workers:
        name = f"{w.role} rank {w.rank}"
        if name in cpu:
            cpu[name]["sim_busy_s"] = w.busy_s
    split_keys = ("queue_ms", "prefill_ms", "transfer_ms")
    split_real = {k: rep.mean_of([getattr(r, f"server_{k}") for r in real.result.requests]) for k in split_keys}
    split_sim = {k: rep.mean_of([getattr(r, k) for r in res.requests]) for k in split_keys}

    rep.print_comparison(f"Simulator fidelity: {s.model}, {s.policy}, {s.prefill}P+{s.decode}D, {len(requests)} "
                         f"{s.workload} requests at {s.rate:g} req/s", rows, s.tolerance)
    rep.print_split(split_real, split_sim)
    rep.print_cpu(cpu)
    print(f"load average before / after the replay: {real.load_before} / {real.load_after}")
    print(f"diagnosis: with each worker's step times stretched by its measured wait for a CPU (prefill x"
          f"{stretch['prefill']:.2f}, decode x{stretch['decode']:.2f}) the simulator's errors would be: "
          + ", ".join(f"{r.label} {100 * r.error:+.1f}%" for r in adj_rows))
    run_s = time.perf_counter() - start
    verdict = "within" if all(r.within(s.tolerance) for r in rows) else "NOT within"
    print(f"same requests on both sides: {same}; simulator {verdict} {s.tolerance:.0%} on every figure; "
          f"real replay {real.wall_s:.0f} s, whole run {run_s:.0f} s")
    if args.out:
        summary = rep.summary(
            rows, s.tolerance, num_requests=len(requests), same_requests=same,
            measured_completed=sum(r.status == "ok" for r in real.result.requests), sim_completed=len(res.requests),
            prefill_stretch=stretch["prefill"], decode_stretch=stretch["decode"],
            stretched_max_abs_error=max(abs(r.error) for r in adj_rows),
            load_avg_before=real.load_before[0] if real.load_before else None,
            load_avg_after=real.load_after[0] if real.load_after else None,
            real_replay_s=real.wall_s, run_s=run_s,
        )
        write_json(
            args.out, summary, dataclasses.asdict(s) | {"tpot_over": "requests with more than one output token"},
            stretched={"stretch": stretch, "figures": {r.key: {"simulated_ms": r.simulated_ms, "error": r.error}
                                                       for r in adj_rows}},
            ttft_split={"measured": split_real, "simulated": split_sim}, cpu=cpu,
            real={"summary": summarize(real.result), "load_before": real.load_before, "load_after": real.load_after},
            sim={"duration_s": res.duration_s, "counters": res.counters, "worker_busy": res.worker_busy},
            requests=_request_rows(requests, real.result, res),
        )
        print(f"wrote {args.out}")
    return 0 if same else 1

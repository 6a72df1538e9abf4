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
   per worker with the profile, the same pool and token budget, workers that read messages
   only between steps (as the live worker loop does) and chunk prompts to fill the budget (as
   our engine does); a KV transfer costs bytes / link rate + latency, the gloo figures
   `bench kv-transfer` measured on this machine. With `--calibrate N` (default 20) the real
   cluster first replays N other requests (those after the measured ones in the trace, other
   arrival times), and each role's step times are scaled by its CPU time there over the
   profile's time for the same steps: a profile fitted on one process alone misses what the
   two workers cost each other on a small machine. The measured slice is never used to fit.
5. The table: TTFT and TPOT p50/p90 and mean JCT, measured against simulated, each error and
   whether it is within `--tolerance`; the same for the profile as fitted; JSON with the same
   `summary`, both sides' requests, and where the real time went: each process's CPU time and
   its wait for a CPU (schedstat) against the profile on the steps it ran (rebuilt from token
   times) and the simulated busy time, and the share of a CPU a busy thread got during the
   replay (`cpu_share.CPUProbe`). The simulator gives each worker a core of its own; on a
   shared machine the workers wait for one, so a simulation with every step stretched by
   1 / that share is reported too: a diagnosis, not the prediction. `--engine sim` (workers
   that sleep the profile's step times) checks the simulator against the live system's
   mechanics alone: coordinator, worker loops, transfers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from ecoserve.bench.fidelity import report as rep
from ecoserve.bench.fidelity.cpu_share import load_average
from ecoserve.bench.fidelity.runs import (
    LINK_GBS, LINK_LATENCY_MS, POLICIES, RealRun, Settings, build_requests, layout, run_real, run_sim, settings_from,
)
from ecoserve.latency.profile import LatencyProfile, load_profile
from ecoserve.data.workload import WorkloadRequest


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ecoserve.sim.workloads import WORKLOADS

    p.add_argument("--model", default="smollm2-135m", help="built-in name or local Hugging Face folder")
    p.add_argument("--profile", default=None, help="a profile .json (default: the bundled one of --model)")
    p.add_argument("--fit", action="store_true", help="fit a fresh profile of --model first (ecoserve profile)")
    p.add_argument("--quick", action="store_true", help="with --fit: profile's quick grid (tests)")
    p.add_argument("--fit-out", default=None, help="with --fit: where to write it (default: beside --out)")
    p.add_argument(
        "--engine", default="model", choices=["model", "sim"],
        help="model: the workers run the model; sim: they sleep the profile's step times instead (serve --engine "
        "sim), which checks the simulator against the live system's mechanics alone (coordinator, worker loops, "
        "transfers), free of the profile's error and of CPU contention",
    )
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
    p.add_argument("--mixed", type=int, default=0,
                   help="mixed (colocated) workers: --policy vllm takes only these (--prefill 0 --decode 0 --mixed N)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: the profile's pool)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per prefill step (default: the profile's token budget)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch threads (default: the profile's)")
    p.add_argument("--link-gbs", type=float, default=LINK_GBS, help="KV transfer rate in the simulator (GB/s)")
    p.add_argument("--link-latency-ms", type=float, default=LINK_LATENCY_MS, help="fixed cost of one KV transfer")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO carried by every request, both sides")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO carried by every request, both sides")
    p.add_argument(
        "--calibrate", type=int, default=20, metavar="N",
        help="first replay N other requests of the trace (those after the measured ones) and scale each role's "
        "step times in the simulator by its CPU time there over the profile's for the same steps (0: the profile "
        "as fitted; model engine, 1 prefill + 1 decode)",
    )
    p.add_argument("--tolerance", type=float, default=0.2, help="the error a figure may have (0.2: 20%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")



# --- the command --------------------------------------------------------------------------------


def _steps(prof: LatencyProfile, run: RealRun) -> tuple[list[rep.Batch], list[rep.Batch]]:
    # Tokens of one step arrive within about a millisecond; steps are >= the shortest decode apart.
    return rep.real_batches(run.result, gap_s=0.5 * prof.decode_ms(1, 1, 1) / 1e3)


def calibration(s: Settings, run: RealRun | None) -> dict[str, float]:
    """Each role's CPU time in the calibration replay over the profile's time for the same steps:
    the factor its step times take in the simulator ({} without a calibration replay). CPU time,
    not wall time, so waiting for a CPU does not count; what slows the steps themselves does
    (the two workers sharing the machine's caches and memory, the worker loop's own work)."""
    if run is None:
        return {}
    prof = load_profile(s.profile)
    prefill, decode = _steps(prof, run)
    out = {}
    for role, seconds in zip(("prefill", "decode"), rep.profile_cpu_s(prof, prefill, decode)):
        used = run.cpu.get(f"{role} rank {0 if role == 'prefill' else 1}")
        if used is not None and seconds > 0:
            out[role] = used.main_run_s / seconds
    return out


def _real_steps(s: Settings, real: RealRun, cpu: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The profile as fitted on the steps the measured replay ran (one worker per role only):
    against their CPU time (model engine), and against the wall time of the decode steps run
    back to back (what the live loop adds per step, waiting for a CPU included)."""
    if (s.prefill, s.decode, s.mixed) != (1, 1, 0):
        return {}
    prof = load_profile(s.profile)
    prefill, decode = _steps(prof, real)
    n, wall, model = rep.back_to_back(prof, decode)
    out = {"decode_steps_timed": float(n), "decode_step_wall_over_profile": wall / model if model else math.nan}
    names = ("prefill rank 0", "decode rank 1")
    if s.engine == "model" and all(name in cpu for name in names):
        for name, steps, seconds in zip(names, (prefill, decode), rep.profile_cpu_s(prof, prefill, decode)):
            cpu[name] |= {"real_steps": len(steps), "profile_on_real_steps_s": seconds}
            run = cpu[name]["run_s"]
            out[f"{name.split()[0]}_profile_cpu_error"] = (seconds - run) / run if run > 0 else math.nan
    return out


@dataclass
class Diagnosis:
    """Where the real run's time went, beside the prediction."""

    cpu: dict[str, dict[str, Any]]  # process -> CPU time, wait, steps rebuilt, the profile on them, sim busy
    steps: dict[str, float]  # the profile on the real steps (_real_steps)
    shared_rows: list[rep.Row]  # the prediction with every step / the measured CPU share (model engine)
    split: dict[str, dict[str, float]]


def diagnose(s: Settings, requests: list[WorkloadRequest], real: RealRun, res: Any, sim: Any,
             scale: dict[str, float]) -> Diagnosis:
    cpu: dict[str, dict[str, Any]] = {
        name: {"run_s": c.main_run_s, "wait_s": c.main_wait_s, "all_threads_run_s": c.all_run_s,
               "all_threads_wait_s": c.all_wait_s} for name, c in real.cpu.items()}
    for w in sim.workers:
        if f"{w.role} rank {w.rank}" in cpu:
            cpu[f"{w.role} rank {w.rank}"]["sim_busy_s"] = w.busy_s
    split = rep.split_means(real.result, res)
    steps = _real_steps(s, real, cpu)
    if s.engine == "sim":  # sleeping workers: the CPU share says little about their steps
        return Diagnosis(cpu, steps, [], split)
    shared, _ = run_sim(s, requests, {role: scale.get(role, 1.0) / real.cpu_share for role in ("prefill", "decode", "mixed")})
    split["simulated_cpu_share"] = rep.split_means(real.result, shared)["simulated"]
    return Diagnosis(cpu, steps, rep.compare(rep.measured(real.result), rep.simulated(shared)), split)


def run_fidelity(args: argparse.Namespace) -> int:
    """Exit 0 when both sides ran every request (whatever the errors), 1 otherwise."""
    from ecoserve.data.workload import arrival_span_s

    start = time.perf_counter()
    s = settings_from(args)
    requests = build_requests(s)
    print(f"{len(requests)} {s.workload} requests (prompts <= {s.max_prompt_len} tokens, outputs clipped to "
          f"{s.max_output_len}), Poisson {s.rate:g} req/s over {arrival_span_s(requests):.0f} s; {s.policy}, "
          f"{layout(s)} ({s.engine} engine), {s.num_blocks} KV blocks and {s.threads} "
          f"torch thread(s) per worker, token budget {s.token_budget}; profile {s.profile}; calibration replay "
          f"{s.calibrate} requests; load average {load_average()}", flush=True)
    real = run_real(s, requests, progress=not args.no_progress)
    scale = calibration(s, real.calibration)
    res, sim = run_sim(s, requests, scale)
    same = rep.same_requests(requests, real.result, res)
    rows = rep.compare(rep.measured(real.result), rep.simulated(res))
    plain_rows = rep.compare(rep.measured(real.result), rep.simulated(run_sim(s, requests)[0])) if scale else rows
    diag = diagnose(s, requests, real, res, sim, scale)

    how = (f"profile x{scale.get('prefill', 1):.2f} prefill, x{scale.get('decode', 1):.2f} decode (calibrated on "
           f"{s.calibrate} other requests)" if scale else "profile as fitted")
    if s.engine == "sim":
        how = "sim engine: workers sleep the profile's step times"
    rep.print_comparison(f"Simulator fidelity: {s.model}, {s.policy}, {layout(s)}, {len(requests)} "
                         f"{s.workload} requests at {s.rate:g} req/s; {how}", rows, s.tolerance)
    if scale:
        rep.print_comparison("The same with the profile as fitted (no calibration)", plain_rows, s.tolerance)
    rep.print_split(diag.split)
    rep.print_cpu(diag.cpu)
    if "decode_step_wall_over_profile" in diag.steps:
        print(f"decode steps run back to back: {diag.steps['decode_steps_timed']:.0f}, their wall time "
              f"{diag.steps['decode_step_wall_over_profile']:.2f}x the profile's (as fitted)")
    print(f"load average before / after the replay: {real.load_before} / {real.load_after}; a busy thread got "
          f"{real.cpu_share:.0%} of a CPU on average ({len(real.cpu_shares)} probes)")
    if diag.shared_rows:
        rep.print_comparison(f"Diagnosis, not the prediction: the prediction with every step {1 / real.cpu_share:.2f}x "
                             "longer (the CPU share measured during the replay)", diag.shared_rows, s.tolerance)
    run_s = time.perf_counter() - start
    verdict = "within" if all(r.within(s.tolerance) for r in rows) else "NOT within"
    print(f"same requests on both sides: {same}; simulator {verdict} {s.tolerance:.0%} on every figure; "
          f"real replay {real.wall_s:.0f} s, whole run {run_s:.0f} s")
    if args.out:
        _write(args.out, s, requests, real, res, rows, plain_rows, scale, diag, same=same, run_s=run_s)
        print(f"wrote {args.out}")
    return 0 if same else 1


def _write(out: str, s: Settings, requests: list[WorkloadRequest], real: RealRun, res: Any, rows: list[rep.Row],
           plain_rows: list[rep.Row], scale: dict[str, float], diag: Diagnosis, same: bool, run_s: float) -> None:
    from ecoserve.report import write_json
    from ecoserve.bench.serve.metrics import summarize

    shared = diag.shared_rows
    summary = rep.summary(
        rows, s.tolerance, num_requests=len(requests), same_requests=same,
        measured_completed=sum(r.status == "ok" for r in real.result.requests), sim_completed=len(res.requests),
        calibration_prefill=scale.get("prefill"), calibration_decode=scale.get("decode"),
        uncalibrated_max_abs_error=max(abs(r.error) for r in plain_rows),
        uncalibrated_within_tolerance=all(r.within(s.tolerance) for r in plain_rows),
        cpu_share=real.cpu_share,
        cpu_share_max_abs_error=max(abs(r.error) for r in shared) if shared else None,
        **diag.steps,
        load_avg_before=real.load_before[0] if real.load_before else None,
        load_avg_after=real.load_after[0] if real.load_after else None,
        real_replay_s=real.wall_s, calibration_replay_s=real.calibration.wall_s if real.calibration else None,
        run_s=run_s,
    )
    figures = {name: {r.key: {"simulated_ms": r.simulated_ms, "error": r.error} for r in rs}
               for name, rs in (("uncalibrated", plain_rows), ("cpu_share", shared))}
    write_json(
        out, summary, dataclasses.asdict(s), other_simulations=figures, cpu_shares=real.cpu_shares,
        split=diag.split, cpu=diag.cpu,
        real={"summary": summarize(real.result), "load_before": real.load_before, "load_after": real.load_after},
        sim={"duration_s": res.duration_s, "counters": res.counters, "worker_busy": res.worker_busy},
        requests=rep.request_rows(requests, real.result, res),
    )

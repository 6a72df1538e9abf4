"""`ecoserve bench live-vs-sim`: three policies on two workers each, live on this machine and in
the simulator, and whether the simulator ranks them as the live cluster does.

    ecoserve bench live-vs-sim --model smollm2-135m --rates 0.5,1,2 --num-requests 30 \\
        --out docs/live-vs-sim.json --plot docs/live-vs-sim.png

1. The pairs: ecoserve on 2 mixed workers (its slo schedule budgets each step's prompt tokens by
   the profile), distserve on 1 prefill + 1 decode, vllm on 2 mixed (chunked prefill filling the
   token budget). Every pair gets the same worker settings: KV blocks, block size, token budget,
   torch threads (`bench sim-fidelity`'s Settings, one per pair).
2. The requests: one slice of the workload (`bench sim-fidelity`'s: prompts within
   --max-prompt-len, outputs clipped), the same lengths at every rate, Poisson arrivals seeded
   alike, so each rate's arrival times are the same draw scaled; the same lists for every pair.
   Every request carries the same SLOs (default: twice the profile's prefill of one prompt of
   --max-prompt-len tokens for TTFT, four times its decode step of one request at the longest
   context for TPOT: set from the profile, before any run, for every policy alike).
3. Live: per pair one `ecoserve serve` (model engine by default), warmed up, then each rate's
   replay in turn, lowest first, by `bench serve`'s open-loop client; the pairs one after the
   other in one run (timings on a shared machine drift: one run keeps them comparable).
4. Simulated: the same lists through `sim.Simulator` with the profile as fitted (no calibration:
   the simulator's prediction as a user would get it), one instance per worker.
5. Figures (ranking.py): per policy, rate and side, SLO attainment, JCT mean and p90, TTFT and
   TPOT p50 and p90; goodput = the highest rate of --rates with attainment >= --goal; the
   policies ranked by goodput and by attainment at each rate, live and simulated, and whether
   the rankings agree. A table, JSON (`--out`) and a plot of attainment against rate (`--plot`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any

from ecoserve.bench.fidelity import ranking as rk
from ecoserve.bench.fidelity.cpu_share import load_average
from ecoserve.bench.fidelity.runs import (
    LINK_GBS, LINK_LATENCY_MS, Settings, build_requests, layout, run_real_many, run_sim, settings_from,
)
from ecoserve.data.workload import WorkloadRequest

# (policy, prefill, decode, mixed): two workers each
PAIRS = (("ecoserve", 0, 0, 2), ("distserve", 1, 1, 0), ("vllm", 0, 0, 2))
TTFT_SLO_PREFILLS, TPOT_SLO_STEPS = 2.0, 4.0  # the default SLOs, in units of the profile's unloaded times


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < math.inf for r in rates) or len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"must be distinct rates > 0 (req/s), comma-separated, e.g. 0.5,1,2; got {text!r}")
    return sorted(rates)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ecoserve.sim.workloads import WORKLOADS

    p.add_argument("--model", default="smollm2-135m", help="built-in name or local Hugging Face folder")
    p.add_argument("--profile", default=None, help="a profile .json (default: the bundled one of --model)")
    p.add_argument(
        "--engine", default="model", choices=["model", "sim"],
        help="model: the workers run the model; sim: they sleep the profile's step times (serve --engine sim): the "
        "live side's mechanics alone, fast (tests)",
    )
    p.add_argument("--predictor", default="oracle", help="--policy ecoserve's length predictor, on both sides")
    p.add_argument("--workload", default="azure-conv", choices=WORKLOADS)
    p.add_argument("--num-requests", type=int, default=30, help="requests per rate")
    p.add_argument("--rates", type=_rates, default=[0.5, 1.0, 2.0], metavar="R1,R2,...",
                   help="Poisson rates (req/s), each run by every policy on both sides; goodput is read off these")
    p.add_argument("--goal", type=float, default=0.9, help="the SLO attainment goodput asks for")
    p.add_argument("--max-prompt-len", type=int, default=256, help="keep requests with prompts up to this")
    p.add_argument("--max-output-len", type=int, default=32, help="clip outputs to this")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: the profile's pool)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: the profile's token budget)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch threads (default: the profile's)")
    p.add_argument("--link-gbs", type=float, default=LINK_GBS, help="KV transfer rate in the simulator (GB/s)")
    p.add_argument("--link-latency-ms", type=float, default=LINK_LATENCY_MS, help="fixed cost of one KV transfer")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help=f"TTFT SLO of every request (default: {TTFT_SLO_PREFILLS:g}x the profile's prefill of one "
                   "--max-prompt-len prompt)")
    p.add_argument("--slo-tpot-ms", type=float, default=None,
                   help=f"TPOT SLO of every request (default: {TPOT_SLO_STEPS:g}x the profile's decode step of one "
                   "request at --max-prompt-len + --max-output-len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="draw attainment against rate, live and simulated, to this .png")


def pair_settings(args: argparse.Namespace) -> list[Settings]:
    """One Settings per pair, the same but for policy and layout; SLOs filled in."""
    if not 0 < args.goal <= 1:
        raise ValueError(f"--goal is an SLO attainment in (0, 1], got {args.goal}")
    out = []
    for policy, prefill, decode, mixed in PAIRS:
        ns = argparse.Namespace(**vars(args), policy=policy, prefill=prefill, decode=decode, mixed=mixed, rate=args.rates[0],
                                fit=False, quick=False, fit_out=None, calibrate=0, tolerance=0.2)
        out.append(settings_from(ns))
    ttft, tpot = default_slos(out[0])
    return [dataclasses.replace(s, slo_ttft_ms=args.slo_ttft_ms or ttft, slo_tpot_ms=args.slo_tpot_ms or tpot)
            for s in out]


def default_slos(s: Settings) -> tuple[float, float]:
    """(TTFT, TPOT) ms from the profile's unloaded times (module docstring, 2.)."""
    from ecoserve.latency.profile import load_profile

    prof, n = load_profile(s.profile), s.max_prompt_len
    ctx = n + s.max_output_len
    return TTFT_SLO_PREFILLS * prof.prefill_ms(n, n * n), TPOT_SLO_STEPS * prof.decode_ms(1, ctx, ctx)


def run_live_vs_sim(args: argparse.Namespace) -> int:
    """Exit 0 when every request ran to its end on both sides for every pair and rate, 1 otherwise."""
    from ecoserve.bench.serve.metrics import summarize

    start = time.perf_counter()
    settings = pair_settings(args)
    s0 = settings[0]
    lists = [build_requests(dataclasses.replace(s0, rate=r)) for r in args.rates]
    print(f"{s0.num_requests} {s0.workload} requests per rate (prompts <= {s0.max_prompt_len} tokens, outputs clipped "
          f"to {s0.max_output_len}) at {', '.join(f'{r:g}' for r in args.rates)} req/s; SLOs TTFT {s0.slo_ttft_ms:.0f} "
          f"ms, TPOT {s0.slo_tpot_ms:.0f} ms; {s0.engine} engine, {s0.num_blocks} KV blocks, token budget "
          f"{s0.token_budget}, {s0.threads} torch thread(s) per worker; profile {s0.profile}; load average "
          f"{load_average()}", flush=True)
    figures: dict[str, dict[float, dict[str, rk.Figures]]] = {}
    live_detail: dict[str, Any] = {}
    complete = True
    for s in settings:
        print(f"{s.policy} on {layout(s)}: live, then simulated", flush=True)
        t0 = time.perf_counter()
        runs = run_real_many(s, lists, progress=not args.no_progress)
        figures[s.policy] = {}
        live_detail[s.policy] = {"wall_s": time.perf_counter() - t0, "by_rate": {}}
        for rate, requests, run in zip(args.rates, lists, runs):
            res, simulator = run_sim(dataclasses.replace(s, rate=rate), requests)
            live, sim = rk.live_figures(run.result), rk.sim_figures(res, len(requests), s.slo_ttft_ms or math.inf,
                                                                          s.slo_tpot_ms or math.inf)
            complete &= live.completed == sim.completed == len(requests)
            figures[s.policy][rate] = {"live": live, "sim": sim}
            live_detail[s.policy]["by_rate"][f"{rate:g}"] = {
                # The layout each side ran: the live ranks that answered, the KV they moved between
                # them (none on mixed workers alone), the simulated instances.
                "live_ranks": [k for k in run.cpu if " rank " in k], "kv_sent_bytes": _kv_sent_bytes(run.result),
                "sim_roles": [w.role for w in simulator.workers],
                "replay_s": run.wall_s, "cpu_share": run.cpu_share, "load_before": run.load_before,
                "load_after": run.load_after, "serve_summary": summarize(run.result),
                "sim_duration_s": res.duration_s, "sim_counters": res.counters}
    c = rk.Comparison(list(args.rates), args.goal, {s.policy: layout(s) for s in settings}, figures)
    title = (f"Live ({s0.engine} engine) vs simulated: {s0.model}, {s0.num_requests} {s0.workload} requests per rate, "
             f"SLOs TTFT {s0.slo_ttft_ms:.0f} ms / TPOT {s0.slo_tpot_ms:.0f} ms")
    rk.print_comparison(c, title)
    run_s = time.perf_counter() - start
    print(f"every request ran to its end on both sides: {complete}; whole run {run_s:.0f} s")
    if args.plot:
        rk.plot(c, args.plot, title)
        print(f"wrote {args.plot}")
    if args.out:
        _write(args.out, settings, lists, c, live_detail, complete, run_s)
        print(f"wrote {args.out}")
    return 0 if complete else 1


def _kv_sent_bytes(result: Any) -> float:
    """KV bytes every worker sent over the replay (the server's stats before and after it)."""
    before, after = result.stats_before, result.stats_after
    keys = [k for k in after if k.startswith("rank") and k.endswith(".kv_sent_bytes")]
    return sum(after[k] - before.get(k, 0.0) for k in keys)


def _write(out: str, settings: list[Settings], lists: list[list[WorkloadRequest]], c: rk.Comparison,
           live: dict[str, Any], complete: bool, run_s: float) -> None:
    from ecoserve.report import write_json

    s0 = settings[0]
    summary = c.summary() | {
        "num_requests_per_rate": s0.num_requests, "rates": ",".join(f"{r:g}" for r in c.rates), "goal": c.goal,
        "slo_ttft_ms": s0.slo_ttft_ms, "slo_tpot_ms": s0.slo_tpot_ms, "engine": s0.engine,
        "all_requests_completed": complete, "run_s": run_s,
    } | {f"{s.policy}_layout": layout(s) for s in settings}
    shared = {k: v for k, v in dataclasses.asdict(s0).items() if k not in ("policy", "options", "server_args", "rate",
                                                                           "prefill", "decode", "mixed")}
    pairs = {s.policy: {"prefill": s.prefill, "decode": s.decode, "mixed": s.mixed, "server_args": s.server_args}
             for s in settings}
    requests = {f"{r:g}": [dataclasses.asdict(x) for x in xs] for r, xs in zip(c.rates, lists)}
    write_json(out, summary, shared | {"rates": c.rates, "pairs": pairs}, figures=c.details(), live=live,
               requests=requests)

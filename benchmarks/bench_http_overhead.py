"""What does the OpenAI HTTP front door add to a request? The same open-loop load on ONE running
cluster through the ZeroMQ client (`ecoserve bench serve`'s default backend) and through
`--http-port` (`--backend openai`: streamed /v1/completions), in alternating rounds, with
the same requests (same seed: same arrival times, lengths and token-id prompts) every round.

    python benchmarks/bench_http_overhead.py --engine sim --rounds 4 --num-requests 40 --rate 4 \\
        --out out/http_overhead_sim.json
    python benchmarks/bench_http_overhead.py --engine model --model smollm2-135m --rounds 2 ...

It starts `ecoserve serve --http-port` itself (`--engine sim`: workers sleep the
`--sim-profile`'s step times, so the difference is the front door's, not the model's), or
drives a cluster that is already up (`--addr` and `--base-url`). Rounds alternate the order
(zmq then http, then http then zmq) so a drift of the machine's load falls on both sides.

Reported per backend: TTFT and E2E (p50, p99) over every request of every round; and per request
the paired difference, HTTP minus ZeroMQ for the same request in the same pair of rounds
(p50, p99 of those differences): the latency the front door adds. Failed or lost requests are
counted and left out of the differences.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

import numpy as np

from ecoserve.bench.serve.metrics import BenchResult, summarize
from ecoserve.bench.serve.openai_backend import OpenAITarget, fetch_openai_info, run_openai_benchmark
from ecoserve.bench.serve.run import fetch_server_info, run_benchmark
from ecoserve.bench.serve.workload import ArrivalSpec, WorkloadSpec, build_workload
from ecoserve.client.types import SLO, ServerInfo
from ecoserve.report import print_table, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default=None, help="a running cluster's ZeroMQ address (with --base-url)")
    p.add_argument("--base-url", default=None,
                   help="the same cluster's --http-port API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="the cluster's --api-key, if it has one")
    p.add_argument("--engine", default="sim", choices=("sim", "model"), help="when starting the cluster here")
    p.add_argument("--model", default="tiny-llama", help="when starting the cluster here")
    p.add_argument("--layout", default="1,1,0", help="prefill,decode,mixed workers when starting the cluster here")
    p.add_argument("--policy", default="ecoserve")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--sim-profile", default=None, help="--engine sim: the profile (serve's default when unset)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per backend (alternating order)")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals, requests/s")
    p.add_argument("--prompt-mean", type=float, default=128.0)
    p.add_argument("--output-mean", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the summary and every request's figures as JSON")
    args = p.parse_args(argv)
    if (args.addr is None) != (args.base_url is None):
        p.error("give both --addr and --base-url (one running cluster), or neither (start one here)")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.addr is not None:
        return asyncio.run(_compare(args, args.addr, args.base_url))
    return _with_cluster(args)


def _with_cluster(args: argparse.Namespace) -> int:
    from ecoserve.launcher import free_port
    from ecoserve.local_cluster import local_cluster

    try:
        prefill, decode, mixed = (int(x) for x in args.layout.split(","))
    except ValueError:
        raise SystemExit(f"--layout is three counts P,D,M such as 1,1,0; got {args.layout!r}") from None
    port = free_port()
    extra = ["--policy", args.policy, "--threads-per-worker", str(args.threads_per_worker), "--http-port", str(port),
             "--engine", args.engine]
    if args.api_key:
        extra += ["--api-key", args.api_key]
    if args.sim_profile:
        extra += ["--sim-profile", args.sim_profile]
    with local_cluster(args.model, prefill, decode, mixed, *extra) as addr:
        return asyncio.run(_compare(args, addr, f"http://127.0.0.1:{port}/v1"))


async def _compare(args: argparse.Namespace, addr: str, base_url: str) -> int:
    info: ServerInfo = await fetch_server_info(addr)
    target = OpenAITarget(base_url, info.model_id, args.api_key)
    named = await fetch_openai_info(target, 10.0, info.vocab_size, None)
    http_info = dataclasses.replace(named, vocab_size=info.vocab_size)  # the same token-id prompts on both sides
    spec = WorkloadSpec("synthetic", args.num_requests, ArrivalSpec(args.rate), args.seed,
                        prompt_mean=args.prompt_mean, output_mean=args.output_mean)
    workload = build_workload(spec, info)
    print(f"{len(workload.requests)} synthetic requests at {args.rate:g} req/s to {info.model_id}: "
          f"{args.rounds} rounds per backend, ZeroMQ {addr} and HTTP {base_url}", flush=True)
    runs: dict[str, list[BenchResult]] = {"zmq": [], "http": []}
    for r in range(args.rounds):
        order = ("zmq", "http") if r % 2 == 0 else ("http", "zmq")
        for side in order:
            if side == "zmq":
                result = await run_benchmark(addr, workload, SLO(), seed=args.seed, progress=False)
            else:
                result = await run_openai_benchmark(target, http_info, workload, SLO(), seed=args.seed, progress=False)
            runs[side].append(result)
            s = summarize(result)
            print(f"round {r + 1} {side:>4}: ok {s['completed']}/{s['num_requests']}, "
                  f"TTFT p50 {s['ttft_p50_ms']:.1f} ms, E2E p50 {s['e2e_p50_ms']:.1f} ms", flush=True)
    summary = _summarize(runs)
    _print(summary)
    if args.out:
        details = {side: [[dataclasses.asdict(q) for q in res.requests] for res in results]
                   for side, results in runs.items()}
        settings = vars(args) | {"addr": addr, "base_url": base_url, "model_id": info.model_id}
        write_json(args.out, summary, settings, requests=details)
    failed = [res for results in runs.values() for res in results if any(q.status != "ok" for q in res.requests)]
    return 0 if not failed else 1


def _summarize(runs: dict[str, list[BenchResult]]) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for side, results in runs.items():
        ok = [q for res in results for q in res.requests if q.status == "ok"]
        out[f"{side}_requests"] = sum(len(res.requests) for res in results)
        out[f"{side}_not_ok"] = sum(len(res.requests) for res in results) - len(ok)
        for metric in ("ttft", "e2e", "tpot"):
            values = [v for q in ok if (v := getattr(q, f"{metric}_ms")) is not None]
            for pct in (50, 99):
                out[f"{side}_{metric}_p{pct}_ms"] = _pct(values, pct)
    for metric in ("ttft", "e2e"):
        diffs = []
        for z, h in zip(runs["zmq"], runs["http"]):
            for qz, qh in zip(z.requests, h.requests):
                assert qz.index == qh.index
                a, b = getattr(qz, f"{metric}_ms"), getattr(qh, f"{metric}_ms")
                if qz.status == qh.status == "ok" and a is not None and b is not None:
                    diffs.append(b - a)
        out[f"added_{metric}_pairs"] = len(diffs)
        for pct in (50, 99):
            out[f"added_{metric}_p{pct}_ms"] = _pct(diffs, pct)
        out[f"added_{metric}_mean_ms"] = float(np.mean(diffs)) if diffs else None
    return out


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _print(s: dict[str, float | int | None]) -> None:
    def ms(v: float | int | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    rows = [(side, f"{s[f'{side}_requests'] - s[f'{side}_not_ok']}/{s[f'{side}_requests']}",  # type: ignore[operator]
             *(ms(s[f"{side}_{m}_p{p}_ms"]) for m in ("ttft", "e2e", "tpot") for p in (50, 99)))
            for side in ("zmq", "http")]
    print_table("ZeroMQ vs HTTP on one cluster (ms)", ["backend", "ok", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99",
                                                     "TPOT p50", "TPOT p99"], rows)
    added = [(m.upper(), s[f"added_{m}_pairs"], ms(s[f"added_{m}_p50_ms"]), ms(s[f"added_{m}_p99_ms"]),
              ms(s[f"added_{m}_mean_ms"])) for m in ("ttft", "e2e")]
    print_table("added by HTTP, per request (HTTP - ZeroMQ, same request, same pair of rounds; ms)",
                ["metric", "pairs", "p50", "p99", "mean"], added)


if __name__ == "__main__":
    sys.exit(main())

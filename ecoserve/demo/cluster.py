"""`ecoserve demo`: the main job. A local cluster on this CPU serving a real workload.

1. Starts `ecoserve serve` with the default model (SmolLM2-135M-Instruct), 1 prefill + 1
   decode worker and the `ecoserve` policy, as a user would (a subprocess; stopped with
   SIGTERM at the end, every worker process checked gone).
2. Streams one chat answer to the terminal as the decode worker produces it.
3. Replays a slice of the bundled Azure LLM inference conversation trace (Splitwise, ISCA
   2024; CC-BY): the trace's own arrival gaps (time-scaled so the slice arrives in about a
   minute) and token lengths (prompts of the trace's lengths, outputs forced to its lengths
   with `ignore_eos`), capped to what a 2-core CPU serves in a couple of minutes — the caps
   are printed. A progress bar counts finished requests.
4. Prints the table of `ecoserve bench serve`: TTFT, TPOT, ITL, E2E (p50/p90/p99), SLO
   attainment, throughput, KV-cache utilisation, preemptions.
5. Ends with the head-to-head the project exists for, from the simulator in seconds: the GPUs
   EcoServe and DistServe need for DistServe's OPT-13B chatbot setting at two target rates,
   with their layouts (`demo/headline.py`).

`ecoserve demo --offline` runs the earlier single-process demo (the offline engine).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from ecoserve.local_cluster import local_cluster
from ecoserve.bench.serve.run import connect, print_report, run_benchmark
from ecoserve.bench.serve.metrics import summarize
from ecoserve.bench.serve.report import write_result
from ecoserve.bench.serve.workload import ArrivalSpec, WorkloadSpec, build_workload
from ecoserve.client.types import SLO
from ecoserve.params import SamplingParams

QUESTION = "What is the capital of France, and what is it famous for? Answer in three sentences."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=24, help="requests of the trace slice to replay")
    p.add_argument("--policy", default="ecoserve", help="ecoserve (default), distserve, vllm or orca")
    p.add_argument("--layout", type=_layout, default=(1, 1, 0), metavar="P,D,M",
                   help="prefill, decode and mixed workers (default 1,1,0; the README says why)")
    p.add_argument("--arrive-within", type=float, default=60.0, help="seconds over which the slice arrives")
    p.add_argument("--max-prompt-len", type=int, default=768, help="cap on the trace's prompt lengths (tokens)")
    p.add_argument("--max-output-len", type=int, default=96, help="cap on the trace's output lengths (tokens)")
    p.add_argument("--slo-ttft-ms", type=float, default=8000.0, help="TTFT SLO for the attainment figure")
    p.add_argument("--slo-tpot-ms", type=float, default=400.0, help="TPOT SLO for the attainment figure")
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per worker (16 tokens each)")
    p.add_argument("--headline-rates", type=_rates, default=(4.0, 16.0),
                   help="target rates (req/s, comma-separated) of the closing simulated GPU-count head-to-head")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--offline", action="store_true", help="the single-process offline demo instead")


def run_cluster_demo(args: argparse.Namespace) -> int:
    if args.num_requests < 1 or not args.arrive_within > 0:
        raise ValueError(f"need --num-requests >= 1 and --arrive-within > 0, got {args.num_requests}, {args.arrive_within}")
    prefill, decode, mixed = args.layout
    shown = ", ".join(f"{n} {role}" for n, role in zip(args.layout, ("prefill", "decode", "mixed")) if n)
    print(f"starting a local cluster: {args.model}, workers {shown}, policy {args.policy} ...", flush=True)
    start = time.perf_counter()
    with local_cluster(
        args.model, prefill, decode, mixed, "--policy", args.policy, "--num-blocks", str(args.num_blocks),
        "--threads-per-worker", "1", dtype=args.dtype, device=args.device,
    ) as addr:
        print(f"cluster up at {addr} in {time.perf_counter() - start:.0f} s\n", flush=True)
        asyncio.run(_chat(addr))
        result, spec, workload = asyncio.run(_replay(addr, args))
    print()
    print_report(result, title=f"EcoServe demo: {len(workload.requests)} Azure conversation requests")
    if args.out:
        write_result(args.out, result, {"workload": spec.name, "num_requests": spec.num_requests,
                                        "policy": args.policy, "model": args.model, "layout": list(args.layout)})
        print(f"wrote {args.out}")
    print()
    from ecoserve.demo.headline import head_to_head, render

    print(render(head_to_head(args.headline_rates)), flush=True)
    s = summarize(result)
    return 0 if s["lost"] == 0 and s["failed"] == 0 else 1


def _layout(text: str) -> tuple[int, int, int]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0 or not any(counts):
        raise argparse.ArgumentTypeError(
            f"give prefill,decode,mixed worker counts >= 0, not all 0 (e.g. 1,1,0 or 0,0,2), got {text!r}")
    return counts  # type: ignore[return-value]


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(","))
    except ValueError:
        rates = ()
    if not rates or not all(0 < r < float("inf") for r in rates):
        raise argparse.ArgumentTypeError(f"give target rates > 0 in requests/s, comma-separated (e.g. 4,16), got {text!r}")
    return rates


async def _chat(addr: str) -> None:
    client = await connect(addr)
    try:
        from transformers import AutoTokenizer

        from ecoserve.model.registry import resolve_model

        assert client.server_info is not None
        tok = AutoTokenizer.from_pretrained(str(resolve_model(client.server_info.model_id or "smollm2-135m")))
        prompt = str(tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True))
        print(f"user: {QUESTION}\nassistant: ", end="", flush=True)
        async for delta in client.stream(prompt, SamplingParams(max_tokens=96, temperature=0)):
            print(delta.text, end="", flush=True)
        print("\n", flush=True)
    finally:
        await client.close()


async def _replay(addr: str, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    client = await connect(addr)
    server = client.server_info
    await client.close()
    assert server is not None
    # Replay the trace's own gaps, scaled so that the slice arrives within --arrive-within s.
    probe = build_workload(WorkloadSpec("azure-conv", args.num_requests, ArrivalSpec(replay=True)), server)
    span = max(r.arrival_s for r in probe.requests) - min(r.arrival_s for r in probe.requests)
    scale = args.arrive_within / span if span > 0 else 1.0
    spec = WorkloadSpec(
        "azure-conv", args.num_requests, ArrivalSpec(replay=True, time_scale=scale),
        max_prompt_len=args.max_prompt_len, max_output_len=args.max_output_len,
    )
    workload = build_workload(spec, server)
    print(f"replaying {len(workload.requests)} requests of the Azure conversation trace (timestamps x{scale:.3g}; "
          f"prompts capped at {args.max_prompt_len} tokens ({workload.clipped_prompts} clipped), outputs at "
          f"{args.max_output_len} ({workload.clipped_outputs} clipped))", flush=True)
    slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)
    result = await run_benchmark(addr, workload, slo)
    return result, spec, workload


def main_entry(args: argparse.Namespace) -> int:
    if args.offline:
        from ecoserve.demo.offline import run_offline_demo

        return run_offline_demo(args)
    try:
        return run_cluster_demo(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


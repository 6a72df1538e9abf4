"""The coordinator's own cost under load: `ecoserve bench coordinator`.

Starts a tiny-llama cluster (1 prefill + 1 decode by default) sized so that nothing waits
for KV or for a prefill slot, sends `--num-requests` requests at once from one client, and
reads the coordinator's stats while they are all in flight and again at the end:

- dispatch_ms: per request, from its frame's arrival at the front door to the scheduling
  decision that dispatched it (decode, validation, queueing behind the other frames of the
  burst, and the policy call);
- schedule_call_us: one `policy.schedule(state)` call.

The model is tiny so that the workers, not the coordinator, are cheap; on 2 cores the
workers still compete with the coordinator for CPU, which is counted in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from typing import Any

from ecoserve.local_cluster import local_cluster
from ecoserve.report import print_table, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")


async def _load(addr: str, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    from ecoserve.client import AsyncClient
    from ecoserve.params import SamplingParams

    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    async with await AsyncClient.connect(addr, timeout=60) as client:
        prompts = [[rng.randrange(1, 1000) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
        tasks = [asyncio.ensure_future(client.generate(p, params, timeout=1800)) for p in prompts]
        await asyncio.sleep(0.01)  # let every request go out before the first stats call
        peak: dict[str, float] = {}
        while not all(t.done() for t in tasks):
            stats = await client.stats()
            if stats["requests_in_flight"] >= peak.get("requests_in_flight", -1):
                peak = stats
            await asyncio.sleep(0.1)
        for t in tasks:
            t.result()
        return peak, await client.stats()


def run_coordinator_benchmark(args: argparse.Namespace) -> int:
    tokens = args.num_requests * (args.prompt_len + args.max_tokens)
    blocks = str(2 * (tokens // 16 + args.num_requests))
    budget = str(max(1024, args.num_requests * args.prompt_len))
    extra = ("--num-blocks", blocks, "--max-num-batched-tokens", budget, "--max-num-seqs", str(args.num_requests))
    with local_cluster(args.model, args.prefill, args.decode, 0, *extra) as addr:
        peak, final = asyncio.run(_load(addr, args))
    rows = [
        ("dispatch_ms (arrival -> dispatch decision)", final["dispatch_ms.p50"], final["dispatch_ms.p99"], final["dispatch_ms.max"]),
        ("schedule_call_us (one policy call)", final["schedule_call_us.p50"], final["schedule_call_us.p99"], final["schedule_call_us.max"]),
    ]
    print_table(
        f"Coordinator cost, {args.num_requests} requests sent at once (peak in flight: {peak['requests_in_flight']:.0f})",
        ["metric", "p50", "p99", "max"], rows,
    )
    summary: dict[str, Any] = {
        "num_requests": args.num_requests,
        "peak_in_flight": peak["requests_in_flight"],
        "dispatch_p50_ms": final["dispatch_ms.p50"],
        "dispatch_p99_ms": final["dispatch_ms.p99"],
        "schedule_call_p50_us": final["schedule_call_us.p50"],
        "schedule_call_p99_us": final["schedule_call_us.p99"],
        "finished": final["finished"],
        "failed": final["failed"],
    }
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        write_json(args.out, summary, settings | {"extra_serve_args": list(extra)}, stats_at_peak=peak, stats_final=final)
    return 0 if final["failed"] == 0 else 1

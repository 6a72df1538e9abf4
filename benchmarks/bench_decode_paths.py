"""Decode step with the CPU C kernel against the pure-torch attention path (the engine before
it), in one process, rounds interleaved: at batch 1 against the memory-bandwidth floor (each
step timing paired with a copy-bandwidth reading, as `bench engine` does), and at a larger batch
with ragged contexts like the ShareGPT workload's.

    python benchmarks/bench_decode_paths.py --dtype float32 --out out/bench_decode_paths.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from ecoserve.bench.engine import floor_rounds
from ecoserve.engine.llm import LLM
from ecoserve.engine.model_runner import ModelRunner
from ecoserve.params import SamplingParams
from ecoserve.report import print_table, write_json


def ragged_step_ms(llm: LLM, batch: int, steps: int = 6) -> float:
    """Median decode step for `batch` sequences with contexts spread over 20..600 tokens."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    ids = [f"ragged-{time.monotonic_ns()}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [100 + (i * 7 + j) % 5000 for j in range(20 + (i * 97) % 580)], params)
    seqs = [engine.sequences[r] for r in ids]
    while not all(s.num_computed_tokens >= len(s.prompt_token_ids) for s in seqs):
        engine.step()
    engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        engine.release(rid)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, device="cpu", max_num_seqs=args.batch)
    runner = llm.engine.runner
    assert isinstance(runner, ModelRunner)
    if not runner.use_cpu_kernel:
        raise SystemExit("the CPU kernel is not available here (no C compiler, or ECOSERVE_CPU_KERNELS=0)")
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    results: dict[str, dict[str, list[float]]] = {"torch": {}, "kernel": {}}
    for _ in range(args.rounds):
        for name, use in (("torch", False), ("kernel", True)):
            runner.use_cpu_kernel = use
            r = floor_rounds(llm, rounds=1)[0]
            got = results[name]
            got.setdefault("b1_step_ms", []).append(r.step_ms)
            got.setdefault("b1_floor_ms", []).append(r.floor_ms)
            got.setdefault("b1_floor_fraction", []).append(r.fraction)
            got.setdefault("ragged_step_ms", []).append(ragged_step_ms(llm, args.batch))
    med = {name: {k: statistics.median(v) for k, v in got.items()} for name, got in results.items()}
    print_table(
        f"Decode step, torch attention path vs C kernel ({args.model}, {args.dtype}; medians of {args.rounds} interleaved rounds)",
        ["path", "b=1 step ms", "b=1 floor ms", "floor / step", f"b={args.batch} ragged step ms"],
        [(n, f"{m['b1_step_ms']:.2f}", f"{m['b1_floor_ms']:.2f}", f"{m['b1_floor_fraction']:.0%}", f"{m['ragged_step_ms']:.1f}")
         for n, m in med.items()],
    )
    summary = {f"{n}_{k}": v for n, m in med.items() for k, v in m.items()}
    summary["ragged_speedup"] = med["torch"]["ragged_step_ms"] / med["kernel"]["ragged_step_ms"]
    summary["b1_speedup"] = med["torch"]["b1_step_ms"] / med["kernel"]["b1_step_ms"]
    if args.out:
        write_json(args.out, summary, vars(args), rounds=results)


if __name__ == "__main__":
    main()

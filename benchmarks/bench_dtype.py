"""Which dtype should the CPU serving path use? Times one decode step of the real model at
batch 1 and 32 per dtype, plus a bare matmul, and writes JSON.

    python benchmarks/bench_dtype.py --model smollm2-135m --out out/bench_dtype.json
"""

from __future__ import annotations

import argparse
import time

import torch

from ecoserve.bench.engine import decode_step_ms
from ecoserve.report import print_table, write_json
from ecoserve.engine.llm import LLM


def matmul_ms(dtype: torch.dtype, batch: int, n: int = 3072, k: int = 576, repeats: int = 50) -> float:
    w, x = torch.randn(n, k, dtype=dtype), torch.randn(batch, k, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows, results = [], {}
    for name in ("float32", "bfloat16", "float16"):
        llm = LLM(model=args.model, dtype=name, device="cpu", max_num_seqs=64)
        b1, b32 = decode_step_ms(llm, 1), decode_step_ms(llm, 32)
        mm = matmul_ms(getattr(torch, name), 1)
        rows.append((name, f"{b1:.1f}", f"{b32:.1f}", f"{mm:.3f}"))
        results[name] = (b1, b32)
        del llm
    print_table(f"Decode step on CPU by dtype ({args.model})", ["dtype", "batch 1 ms", "batch 32 ms", "matmul 3072x576 b1 ms"], rows)
    best = min(results, key=lambda d: results[d][0] + results[d][1])
    summary = {f"{d}_b{b}_ms": results[d][i] for d in results for i, b in enumerate((1, 32))}
    summary["fastest"] = best
    if args.out:
        write_json(args.out, summary, vars(args))


if __name__ == "__main__":
    main()

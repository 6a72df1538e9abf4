"""Time paged decode attention, Triton kernel vs torch reference, on a CUDA GPU.

    python benchmarks/bench_kernels.py --out out/bench_kernels.json

Prints a table and writes JSON whose top-level ``summary`` holds the headline figures, beside
the machine, the settings and one row per shape. Needs a GPU; on CPU it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ecoserve.kernels import ops


@dataclass(frozen=True)
class Shape:
    batch: int
    context_len: int  # every sequence has this length, so bytes moved are exact
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int


SHAPES = [
    Shape(1, 1024, 32, 8, 128, 16),
    Shape(16, 1024, 32, 8, 128, 16),
    Shape(64, 2048, 32, 8, 128, 16),
    Shape(64, 512, 32, 32, 128, 16),  # no GQA
    Shape(32, 4096, 32, 8, 128, 32),
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class DecodeInputs:
    query: Tensor  # [batch, num_q_heads, head_dim]
    k_cache: Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor
    block_tables: Tensor  # [batch, blocks_per_seq]
    context_lens: Tensor  # [batch]
    scale: float

    def run(self, backend: ops.Backend) -> Tensor:
        return ops.paged_decode_attention(
            self.query,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.context_lens,
            self.scale,
            backend=backend,
        )


def make_inputs(shape: Shape, dtype: torch.dtype, gen: torch.Generator) -> DecodeInputs:
    blocks_per_seq = math.ceil(shape.context_len / shape.block_size)
    num_blocks = shape.batch * blocks_per_seq
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    # shuffled blocks so the kernel sees scattered, not sequential, block ids
    table = torch.randperm(num_blocks, generator=gen).view(shape.batch, blocks_per_seq)
    return DecodeInputs(
        query=torch.randn(shape.batch, shape.num_q_heads, shape.head_dim, generator=gen).to(
            "cuda", dtype
        ),
        k_cache=torch.randn(cache_shape, generator=gen).to("cuda", dtype),
        v_cache=torch.randn(cache_shape, generator=gen).to("cuda", dtype),
        block_tables=table.int().cuda(),
        context_lens=torch.full(
            (shape.batch,), shape.context_len, dtype=torch.int32, device="cuda"
        ),
        scale=shape.head_dim**-0.5,
    )


def time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median milliseconds of ``reps`` calls, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(shape: Shape, dtype: torch.dtype, warmup: int, reps: int) -> dict[str, float | int]:
    inputs = make_inputs(shape, dtype, torch.Generator().manual_seed(0))
    # correctness before speed: the reported error must stay at rounding level
    max_abs_err = (inputs.run("triton").float() - inputs.run("torch").float()).abs().max().item()
    triton_ms = time_ms(lambda: inputs.run("triton"), warmup, reps)
    torch_ms = time_ms(lambda: inputs.run("torch"), warmup, reps)
    # K and V are each read once: the traffic that bounds a decode kernel
    kv_bytes = 2 * shape.batch * shape.context_len * shape.num_kv_heads * shape.head_dim
    kv_bytes *= inputs.k_cache.element_size()
    return {
        **asdict(shape),
        "triton_ms": triton_ms,
        "torch_ms": torch_ms,
        "speedup": torch_ms / triton_ms,
        "triton_gb_per_s": kv_bytes / triton_ms / 1e6,
        "max_abs_err": max_abs_err,
    }


def print_table(rows: list[dict[str, float | int]]) -> None:
    header = (
        f"{'batch':>5} {'ctx':>5} {'hq/hkv':>7} {'dim':>4} {'blk':>4} "
        f"{'triton ms':>10} {'torch ms':>9} {'speedup':>8} {'GB/s':>7} {'max err':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        heads = f"{r['num_q_heads']}/{r['num_kv_heads']}"
        print(
            f"{r['batch']:>5} {r['context_len']:>5} {heads:>7} "
            f"{r['head_dim']:>4} {r['block_size']:>4} "
            f"{r['triton_ms']:>10.3f} {r['torch_ms']:>9.3f} "
            f"{r['speedup']:>8.2f} {r['triton_gb_per_s']:>7.0f} {r['max_abs_err']:>8.1e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(
            "bench_kernels.py needs a CUDA GPU to time the Triton kernels; "
            "torch.cuda.is_available() is False"
        )
    if not ops.triton_available():
        sys.exit("bench_kernels.py needs the triton package: pip install 'ecoserve[gpu]'")

    rows = [bench_shape(shape, DTYPES[args.dtype], args.warmup, args.reps) for shape in SHAPES]
    print_table(rows)
    speedups = [r["speedup"] for r in rows]
    result = {
        "summary": {
            "speedup_geomean": math.exp(statistics.fmean(math.log(s) for s in speedups)),
            "speedup_min": min(speedups),
            "triton_gb_per_s_max": max(r["triton_gb_per_s"] for r in rows),
            "max_abs_err": max(r["max_abs_err"] for r in rows),
            "dtype": args.dtype,
            "device": torch.cuda.get_device_name(),
        },
        "machine": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "settings": {
            "dtype": args.dtype,
            "warmup": args.warmup,
            "reps": args.reps,
            "timer": "median of CUDA events",
        },
        "rows": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Where a step's time goes: torch-profiler breakdown of EcoServe decode and prefill steps.

Runs real engine steps of SmolLM2-135M (or --model) at the batch sizes the 64-request ShareGPT
workload of `ecoserve bench engine` reaches, and groups the profiler's self times by kind:
matmuls, attention, the KV-cache gather and write, elementwise ops (norms, RoPE, SiLU, casts),
other aten ops, and the rest of the step's wall time (Python, dispatch, scheduling, sampling).

    python benchmarks/profile_engine.py --dtype float32 --out out/profile_engine_float32.json
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ecoserve.engine.llm import LLM
from ecoserve.kernels import cpu as cpu_kernels
from ecoserve.params import SamplingParams
from ecoserve.report import print_table, write_json

CATEGORIES = {  # the table's columns: short names, the profiler's op names they cover
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm", "mkldnn::_linear_pointwise"),
    "attention": ("flash_attention", "scaled_dot_product", "aten::_softmax", "ecoserve::"),
    "KV gather": ("aten::index_select",),
    "KV write": ("aten::index_copy_", "aten::index_put_"),
    "elementwise": (
        "aten::mul", "aten::add", "aten::rsqrt", "aten::pow", "aten::mean", "aten::silu", "aten::roll",
        "aten::copy_", "aten::_to_copy", "aten::cat", "aten::neg", "aten::sub", "aten::div", "aten::masked_fill",
        "aten::embedding", "aten::index", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous",
    ),
    "compiled": ("Torch-Compiled Region", "CompiledFunction", "cpp_fused", "inductor"),
}


def categorise(name: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other aten"


def _profiled_c_kernel() -> None:
    """The C attention kernel runs through ctypes, out of the profiler's sight: wrap it in a
    named range here (not in the engine: no cost outside this script) so its time is counted."""
    kernel = cpu_kernels.paged_decode_attention

    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.profiler.record_function("ecoserve::paged_decode_attention (C)"):
            return kernel(*args, **kwargs)

    cpu_kernels.paged_decode_attention = wrapped  # type: ignore[assignment]


def run_steps(llm: LLM, prompts: list[list[int]], max_tokens: int, warm: int, timed: int, decode_only: bool) -> tuple[dict[str, float], float, int]:
    """Add the prompts, step until all decode (if decode_only), then profile `timed` steps.
    Returns per-category ms per step, wall ms per step and the tokens each step computed."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [f"prof-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    seqs = [engine.sequences[r] for r in ids]
    if decode_only:
        while not all(s.num_computed_tokens >= len(s.prompt_token_ids) for s in seqs):
            engine.step()
        for _ in range(warm):
            engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        tokens = 0
        for _ in range(timed):
            engine.step()
            tokens += engine.last_num_scheduled_tokens
        wall = (time.perf_counter() - start) * 1e3 / timed
    for rid in ids:
        engine.release(rid)
    per_cat: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        per_cat[categorise(evt.key)] += evt.self_cpu_time_total / 1e3 / timed
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:int(os.environ.get("PROFILE_TOP", "8"))]
    print(f"top ops over {timed} steps:", ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / timed:.1f} ms x{e.count // timed}" for e in top))
    return dict(per_cat), wall, tokens // timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=256, help="cached tokens per decoding sequence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--prefill-tokens", type=int, default=1024, help="one step's prompt tokens (8 prompts)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    _profiled_c_kernel()
    llm = LLM(model=args.model, dtype=args.dtype, device="cpu", max_num_seqs=max(args.batches), max_num_batched_tokens=args.prefill_tokens)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    cases = {}
    for b in args.batches:
        prompts = [[100 + (i * 7 + j) % 5000 for j in range(args.context)] for i in range(b)]
        cases[f"decode b={b} ctx={args.context}"] = run_steps(llm, prompts, 64, warm=2, timed=8 if b > 1 else 16, decode_only=True)
    n = args.prefill_tokens // 8
    # One untimed prefill of the same shape first: the timed step then measures prefill, not the
    # first-use allocation of a step this large.
    run_steps(llm, [[200 + (i * 11 + j) % 5000 for j in range(n)] for i in range(8)], 2, warm=0, timed=1, decode_only=False)
    prompts = [[100 + (i * 7 + j) % 5000 for j in range(n)] for i in range(8)]
    cases[f"prefill 8x{n} tokens"] = run_steps(llm, prompts, 2, warm=0, timed=1, decode_only=False)
    names = list(CATEGORIES) + ["other aten"]
    rows = []
    summary: dict[str, float] = {}
    for case, (cats, wall, tokens) in cases.items():
        rest = wall - sum(cats.values())
        row = [case, f"{wall:.1f}"] + [f"{cats.get(c, 0.0):.1f} ({cats.get(c, 0.0) / wall:.0%})" for c in names]
        rows.append(row + [f"{rest:.1f} ({rest / wall:.0%})"])
        key = case.split(" ")[0] + "_" + case.split(" ")[1].replace("=", "")
        summary[f"{key}_step_ms"] = wall
        for c in names:
            summary[f"{key}_{c.replace(' ', '_')}_ms"] = cats.get(c, 0.0)
        summary[f"{key}_python_rest_ms"] = rest
    print_table(
        f"Step time by kind, {args.model} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads (ms per step, share of wall)",
        ["step", "wall ms"] + names + ["Python/rest"],
        rows,
    )
    if args.out:
        write_json(args.out, summary, vars(args))


if __name__ == "__main__":
    main()

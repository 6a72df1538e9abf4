"""`ecoserve bench engine --against vllm`: EcoServe's offline engine side by side with vLLM's.

The request list (ShareGPT prompts as token ids, vLLM's filter, each output forced to its
length with EOS ignored) is written once; then, per dtype, vLLM's offline `LLM.generate` runs
on it in the user's vLLM interpreter (`--vllm-python`, a subprocess running
`vllm_offline.py`, which imports nothing of ours), then ours in this process, each after one
warm-up request. With `--rounds N` each side runs N times per dtype, in turns (vLLM first in
even rounds, ours first in odd ones), so the machine's drift falls on both sides alike; the
ratio is taken pair by pair. Reported per dtype: median output tokens/s of both, the median
ratio and its range, and the share of requests whose greedy outputs are identical token for
token (the fewest over the rounds); then the batch-1 decode step against the memory-bandwidth
floor. vLLM is never imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ecoserve.bench.engine import FloorRound, Workload, floor_rounds, load_workload
from ecoserve.engine.llm import LLM
from ecoserve.params import SamplingParams
from ecoserve.report import print_table, write_json

VLLM_SCRIPT = Path(__file__).with_name("vllm_offline.py")
DEFAULT_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class SideBySide:
    """One dtype's result."""

    dtype: str
    vllm_s: float
    ecoserve_s: float
    output_tokens: int
    num_identical: int
    num_requests: int
    vllm_info: dict[str, object]

    @property
    def vllm_tok_s(self) -> float:
        return self.output_tokens / self.vllm_s

    @property
    def ecoserve_tok_s(self) -> float:
        return self.output_tokens / self.ecoserve_s

    @property
    def ratio(self) -> float:
        return self.ecoserve_tok_s / self.vllm_tok_s

    @property
    def identical_share(self) -> float:
        return self.num_identical / self.num_requests


@dataclass(frozen=True)
class Rounds:
    """One dtype's rounds, summarised: medians over the rounds, the ratio pair by pair."""

    dtype: str
    rounds: list[SideBySide]

    def __post_init__(self) -> None:
        if not self.rounds or any(r.dtype != self.dtype for r in self.rounds):
            raise ValueError(f"Rounds({self.dtype!r}) needs at least one round, all of that dtype")

    @property
    def vllm_tok_s(self) -> float:
        return statistics.median(r.vllm_tok_s for r in self.rounds)

    @property
    def ecoserve_tok_s(self) -> float:
        return statistics.median(r.ecoserve_tok_s for r in self.rounds)

    @property
    def ratios(self) -> list[float]:
        return [r.ratio for r in self.rounds]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def num_identical(self) -> int:
        return min(r.num_identical for r in self.rounds)

    @property
    def num_requests(self) -> int:
        return self.rounds[0].num_requests


def check_vllm_python(path: str | None) -> str:
    """The interpreter to run vLLM with; ValueError saying what to pass when it is unusable."""
    if not path:
        raise ValueError(
            "--against vllm needs --vllm-python PATH: the python of a virtual environment with vllm "
            "installed (README: 'Side by side with vLLM')"
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ValueError(f"--vllm-python {path!r} is not an executable file; give the python of the vLLM virtual environment")
    return path


def identical_outputs(ours: list[list[int]], theirs: list[list[int]]) -> int:
    """How many requests got the same output token ids on both sides."""
    if len(ours) != len(theirs):
        raise ValueError(f"the two engines returned {len(ours)} and {len(theirs)} outputs for the same requests")
    return sum(a == b for a, b in zip(ours, theirs))


def write_requests(path: Path, work: Workload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompts": work.prompts, "output_lens": work.output_lens}))


def run_vllm(python: str, requests: Path, folder: Path, dtype: str, args: argparse.Namespace, max_model_len: int,
             out: Path) -> dict[str, object]:
    """Run vLLM's side in its own interpreter; its log goes next to `out`."""
    cmd = [python, str(VLLM_SCRIPT), "--requests", str(requests), "--model", str(folder), "--dtype", dtype,
           "--max-num-seqs", str(args.batch_size), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", str(max_model_len), "--seed", str(args.seed), "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    log = out.with_suffix(".log")
    print(f"vLLM {dtype}: {' '.join(cmd)} (log: {log})", flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"vLLM's run failed (exit {done.returncode}); the end of {log}:\n" + "\n".join(tail))
    result: dict[str, object] = json.loads(out.read_text())
    return result


def run_ours(llm: LLM, work: Workload) -> tuple[float, list[list[int]]]:
    llm.generate([work.prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    return elapsed, [o.token_ids for o in outs]


def _ecoserve_llm(args: argparse.Namespace, dtype: str) -> LLM:
    return LLM(model=args.model, dtype=dtype, device=args.device, max_num_seqs=args.batch_size,
               max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)


def run_against_vllm(args: argparse.Namespace) -> int:
    python = check_vllm_python(args.vllm_python)
    dtypes = [args.dtype] if args.dtype != "auto" else list(DEFAULT_DTYPES)
    out_dir = Path(args.out).parent if args.out else Path("out")
    requests = out_dir / "bench_engine_requests.json"
    llm = _ecoserve_llm(args, dtypes[0])
    work = load_workload(llm, args.num_requests, args.max_prompt_len, args.max_total_len, args.max_output_len, args.seed)
    write_requests(requests, work)
    print(f"wrote {requests}: {len(work.prompts)} requests, {sum(map(len, work.prompts))} prompt and "
          f"{work.output_tokens} output tokens", flush=True)
    results: list[Rounds] = []
    floors: dict[str, list[FloorRound]] = {}
    for dtype in dtypes:
        if llm.engine.dtype != getattr(torch, dtype):
            del llm
            llm = _ecoserve_llm(args, dtype)
        rounds = []
        for k in range(args.rounds):
            if args.rounds > 1:
                print(f"{dtype}: round {k + 1} of {args.rounds}, {'vLLM' if k % 2 == 0 else 'EcoServe'} first", flush=True)
            if k % 2 == 1:
                ours_s, ours_ids = run_ours(llm, work)
            theirs = run_vllm(python, requests, llm.engine.folder, dtype, args, llm.engine.max_model_len,
                              out_dir / f"bench_engine_vllm_{dtype}.json")
            if k % 2 == 0:
                ours_s, ours_ids = run_ours(llm, work)
            their_ids = [list(map(int, ids)) for ids in theirs["output_token_ids"]]  # type: ignore[attr-defined]
            info = {key: v for key, v in theirs.items() if key != "output_token_ids"}
            rounds.append(SideBySide(dtype, float(theirs["seconds"]), ours_s, work.output_tokens,  # type: ignore[arg-type]
                                     identical_outputs(ours_ids, their_ids), len(work.prompts), info))
        results.append(Rounds(dtype, rounds))
        floors[dtype] = floor_rounds(llm)
        if args.out and len(results) < len(dtypes):  # a run stopped later keeps the dtypes it finished
            write_report(args, work, results, floors, complete=False)
    report(args, work, results, floors)
    return 0


def report(args: argparse.Namespace, work: Workload, results: list[Rounds], floors: dict[str, list[FloorRound]]) -> None:
    n = len(work.prompts)
    rounds = f"; medians of {args.rounds} rounds in turns" if args.rounds > 1 else ""
    print_table(
        f"Offline throughput, EcoServe vs vLLM: {args.model}, {n} ShareGPT requests, {sum(map(len, work.prompts))} "
        f"prompt and {work.output_tokens} output tokens (EOS ignored, greedy), max_num_seqs {args.batch_size}"
        f"{rounds}",
        ["dtype", "vLLM tok/s", "EcoServe tok/s", "ratio EcoServe / vLLM", "ratio range", "identical greedy outputs"],
        [(r.dtype, f"{r.vllm_tok_s:.1f}", f"{r.ecoserve_tok_s:.1f}", f"{r.ratio:.2f}x",
          f"{min(r.ratios):.2f}-{max(r.ratios):.2f}x", f"{r.num_identical}/{n} ({r.num_identical / n:.0%})") for r in results],
    )
    rows = []
    for r in results:
        median = _median_floor(floors[r.dtype])
        rows.append((r.dtype, f"{median.copy_gbs:.1f}", f"{median.floor_ms:.2f}", f"{median.step_ms:.2f}", f"{median.fraction:.0%}"))
    print_table(
        "EcoServe's decode step at batch 1 against the memory-bandwidth floor (median of 5 paired rounds; "
        "copy GB/s counts bytes read + written)",
        ["dtype", "copy GB/s", "floor ms", "step ms", "floor / step"],
        rows,
    )
    if args.out:
        write_report(args, work, results, floors, complete=True)
        print(f"wrote {args.out}")


def _median_floor(rounds: list[FloorRound]) -> FloorRound:
    return sorted(rounds, key=lambda f: f.fraction)[len(rounds) // 2]


def write_report(args: argparse.Namespace, work: Workload, results: list[Rounds], floors: dict[str, list[FloorRound]],
                 complete: bool) -> None:
    """`args.out`'s JSON for the dtypes in `results`; `complete` False while later dtypes are still to run
    (written after each dtype, so a run stopped midway keeps what it measured)."""
    summary: dict[str, Any] = {"complete": complete}
    for r in results:
        median = _median_floor(floors[r.dtype])
        summary.update({
            f"{r.dtype}_vllm_output_tok_s": r.vllm_tok_s,
            f"{r.dtype}_ecoserve_output_tok_s": r.ecoserve_tok_s,
            f"{r.dtype}_ratio": r.ratio,
            f"{r.dtype}_ratio_min": min(r.ratios),
            f"{r.dtype}_ratio_max": max(r.ratios),
            f"{r.dtype}_rounds": len(r.rounds),
            f"{r.dtype}_identical_share": r.num_identical / r.num_requests,
            f"{r.dtype}_decode_step_ms_batch1": median.step_ms,
            f"{r.dtype}_bandwidth_floor_ms": median.floor_ms,
            f"{r.dtype}_floor_fraction": median.fraction,
        })
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    details = {
        "per_dtype": {r.dtype: {"rounds": [{"vllm": x.vllm_info, "vllm_seconds": x.vllm_s, "ecoserve_seconds": x.ecoserve_s,
                                            "ratio": x.ratio, "num_identical": x.num_identical} for x in r.rounds],
                                "floor_rounds": [asdict(f) for f in floors[r.dtype]]} for r in results},
        "workload": {"prompt_lens": [len(p) for p in work.prompts], "output_lens": work.output_lens},
    }
    write_json(args.out, summary, settings, **details)


__all__ = ["run_against_vllm", "identical_outputs", "check_vllm_python", "SideBySide", "Rounds"]

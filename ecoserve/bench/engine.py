"""`ecoserve bench engine`: offline throughput of EcoServe's engine against transformers
(`--against vllm`: against vLLM's offline engine, bench/against_vllm.py).

Both sides get the same ShareGPT-shaped requests (prompt text from ShareGPT, output length =
the length of ShareGPT's reply, clipped to `--max-output-len`), forced to that length with EOS
ignored. The baseline is what a user without a serving engine would run: transformers
`generate` on static, left-padded batches of `--batch-size` requests, each batch running until
its longest output is done. Throughput counts only the requested output tokens on both sides.

It also reports EcoServe's decode step time at batch 1 against the memory-bandwidth floor
(weight bytes / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ecoserve.bench.memory import copy_bandwidth_gbs, weight_bytes_per_decode_step
from ecoserve.report import print_table, write_json
from ecoserve.data.sharegpt import sharegpt_requests
from ecoserve.engine.llm import LLM
from ecoserve.engine.model_runner import ModelRunner
from ecoserve.params import SamplingParams


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def load_workload(
    llm: LLM, num_requests: int, max_prompt_len: int, max_total_len: int, max_output_len: int | None, seed: int
) -> Workload:
    """ShareGPT pairs filtered as vLLM's serving benchmark filters them (prompt <= 1024 and
    prompt + reply <= 2048 tokens by default), each clipped to the model's context."""
    room = llm.engine.max_model_len
    reqs = sharegpt_requests(
        llm.tokenizer, num_requests, seed=seed, max_prompt_len=min(max_prompt_len, room - 1), max_total_len=max_total_len
    )
    prompts = [llm.encode_prompt(r.prompt or "") for r in reqs]
    cap = max_output_len or room
    outs = [max(1, min(r.output_len, cap, room - len(p))) for r, p in zip(reqs, prompts)]
    return Workload(prompts, outs)


def run_ecoserve(llm: LLM, work: Workload) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    got = [len(o.token_ids) for o in outs]
    assert got == work.output_lens, "EcoServe produced a different number of tokens than requested"
    return elapsed


def run_transformers(folder: str, dtype: torch.dtype, work: Workload, batch_size: int, pad_id: int) -> float:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    start = time.perf_counter()
    for i in tqdm(range(0, len(work.prompts), batch_size), desc="transformers", unit="batch"):
        prompts = work.prompts[i : i + batch_size]
        new = max(work.output_lens[i : i + batch_size])
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, generation_config=config)
        assert out.shape[1] == width + new
    return time.perf_counter() - start


def decode_step_ms(llm: LLM, batch: int = 1, context: int = 128, steps: int = 24) -> float:
    """Median wall time of a decode step for `batch` sequences with ~`context` cached tokens each.

    Only steps in which every sequence has finished its prompt are timed.
    """
    engine = llm.engine
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    ids = [f"bench-decode-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [100 + (i + j) % 1000 for j in range(context)], params)
    seqs = [engine.sequences[rid] for rid in ids]
    times = []
    while engine.has_unfinished():
        decoding = all(s.num_computed_tokens >= len(s.prompt_token_ids) for s in seqs)
        start = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - start)
    for rid in ids:
        engine.pop_finished(rid)
    return statistics.median(times) * 1e3


@dataclass(frozen=True)
class FloorRound:
    copy_gbs: float
    step_ms: float
    floor_ms: float

    @property
    def fraction(self) -> float:
        return self.floor_ms / self.step_ms


def model_weight_bytes(llm: LLM) -> int:
    runner = llm.engine.runner
    if not isinstance(runner, ModelRunner):
        raise ValueError("bench engine measures the model; the sim engine has none")
    return weight_bytes_per_decode_step(runner.model)


def floor_rounds(llm: LLM, rounds: int = 5) -> list[FloorRound]:
    """Pairs each batch-1 step timing with a copy-bandwidth reading taken just before it.

    On a shared machine the bandwidth a neighbour leaves us drifts by tens of percent within
    minutes; pairing keeps each floor / step ratio about one moment.
    """
    weight_bytes = model_weight_bytes(llm)
    out = []
    for _ in range(rounds):
        gbs = copy_bandwidth_gbs(repeats=3, device=llm.engine.device)
        out.append(FloorRound(gbs, decode_step_ms(llm), weight_bytes / (gbs * 1e9) * 1e3))
    return out


def run_engine_benchmark(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.rounds < 1 or (args.rounds != 1 and args.against != "vllm"):
        raise ValueError(f"--rounds {args.rounds}: a whole number >= 1, and only with --against vllm "
                         "(the transformers baseline runs once)")
    if args.against == "vllm":
        from ecoserve.bench.against_vllm import run_against_vllm

        return run_against_vllm(args)
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.batch_size,
              max_num_batched_tokens=args.max_num_batched_tokens)
    work = load_workload(llm, args.num_requests, args.max_prompt_len, args.max_total_len, args.max_output_len, args.seed)
    # Warm up both code paths (allocator, thread pools) on a short request.
    llm.generate([work.prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    ours_s = run_ecoserve(llm, work)
    ours_tps = work.output_tokens / ours_s
    rounds = floor_rounds(llm)
    weight_bytes = model_weight_bytes(llm)
    median_round = sorted(rounds, key=lambda r: r.fraction)[len(rounds) // 2]
    step_ms, bandwidth, floor_ms = median_round.step_ms, median_round.copy_gbs, median_round.floor_ms
    hf_s = None
    if not args.skip_baseline:
        pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
        hf_s = run_transformers(str(llm.engine.folder), llm.engine.dtype, work, args.batch_size, pad)
    hf_tps = work.output_tokens / hf_s if hf_s else None
    summary = {
        "ecoserve_output_tok_s": ours_tps,
        "transformers_output_tok_s": hf_tps,
        "ratio": ours_tps / hf_tps if hf_tps else None,
        "decode_step_ms_batch1": step_ms,
        "bandwidth_floor_ms": floor_ms,
        "floor_fraction": floor_ms / step_ms,  # the median of the paired rounds
        "copy_bandwidth_gbs": bandwidth,  # read + write bytes per second (STREAM's Copy convention)
        "weight_bytes": weight_bytes,
    }
    rows = [
        ("ecoserve (continuous batching, paged KV)", f"{ours_s:.1f}", f"{ours_tps:.1f}", "1.00" if not hf_tps else f"{ours_tps / hf_tps:.2f}"),
    ]
    if hf_s:
        rows.append(("transformers generate (static padded batches)", f"{hf_s:.1f}", f"{hf_tps:.1f}", "1.00"))
    print_table(
        f"Offline throughput: {args.model}, {args.num_requests} ShareGPT requests, "
        f"{work.output_tokens} output tokens, batch {args.batch_size}, {llm.engine.dtype}",
        ["engine", "seconds", "output tok/s", "ratio vs transformers"],
        rows,
    )
    print_table(
        f"Decode step at batch 1 against the memory-bandwidth floor ({weight_bytes / 1e6:.1f} MB of weights; "
        "copy GB/s counts bytes read + written)",
        ["round", "copy GB/s", "floor ms", "step ms", "floor / step"],
        [(i + 1, f"{r.copy_gbs:.1f}", f"{r.floor_ms:.2f}", f"{r.step_ms:.2f}", f"{r.fraction:.0%}") for i, r in enumerate(rounds)],
    )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        settings["dtype_resolved"] = str(llm.engine.dtype)
        details = {"prompt_lens": [len(p) for p in work.prompts], "output_lens": work.output_lens}
        write_json(args.out, summary, settings, workload=details, floor_rounds=[asdict(r) for r in rounds])
        print(f"wrote {args.out}")
    return 0


__all__ = ["run_engine_benchmark", "Workload"]

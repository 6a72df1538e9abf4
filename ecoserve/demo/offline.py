"""`ecoserve demo`: the main job until the cluster exists — offline generation with the default
model on a slice of real ShareGPT prompts, with a progress bar and a summary table."""

from __future__ import annotations

import argparse
import time

from ecoserve.report import print_table
from ecoserve.data.sharegpt import sharegpt_requests
from ecoserve.engine.llm import LLM
from ecoserve.params import SamplingParams

QUESTION = "What is the capital of France, and what is it famous for?"


def run_offline_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    print(f"loaded {args.model} ({llm.engine.dtype}, {llm.engine.device}) in {time.perf_counter() - start:.1f} s")
    answer = llm.generate([QUESTION], SamplingParams(max_tokens=64, temperature=0), chat=True)[0]
    print(f"\nuser: {QUESTION}\nassistant: {answer.text}\n")

    reqs = sharegpt_requests(llm.tokenizer, args.num_requests, seed=0, max_prompt_len=512)
    prompts = [r.prompt or "" for r in reqs]
    params = [SamplingParams(max_tokens=min(r.output_len, 128), temperature=0.7, top_p=0.9, seed=i) for i, r in enumerate(reqs)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True, chat=True)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    output_tokens = sum(len(o.token_ids) for o in outs)
    print_table(
        f"Offline generation: {len(outs)} ShareGPT chat prompts, {args.model}",
        ["requests", "prompt tokens", "output tokens", "seconds", "output tok/s", "preemptions"],
        [(len(outs), prompt_tokens, output_tokens, f"{elapsed:.1f}", f"{output_tokens / elapsed:.1f}", sum(o.num_preemptions for o in outs))],
    )
    sample = outs[0]
    print(f"\nsample prompt: {prompts[0][:200]!r}\nsample answer: {sample.text[:300]!r}")
    llm.engine.pool.assert_no_leaks()
    return 0

"""vLLM's side of `ecoserve bench engine --against vllm`, run by the user's vLLM interpreter.

A standalone script: it imports only the standard library and vllm (never ecoserve, whose
dependencies the vLLM virtual environment need not have). It reads the request list the
benchmark wrote (token-id prompts and output lengths), runs vLLM's offline `LLM.generate` on
them greedily with EOS ignored after one warm-up request, and writes the elapsed seconds and
every request's output token ids as JSON.

    VLLM_PYTHON ecoserve/bench/vllm_offline.py --requests R.json --model FOLDER --dtype float32 --out V.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Python put this file's folder (ecoserve/bench) first on sys.path; its profile.py would shadow
# the standard library's module of that name, which torch imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", required=True, help="JSON: {prompts: [[ids]], output_lens: [n]}")
    p.add_argument("--model", required=True, help="the model folder")
    p.add_argument("--dtype", required=True)
    p.add_argument("--max-num-seqs", type=int, required=True)
    p.add_argument("--max-num-batched-tokens", type=int, required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    work = json.loads(open(args.requests).read())
    prompts, output_lens = work["prompts"], work["output_lens"]
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], warm, use_tqdm=False)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False) for n in output_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {
        "seconds": elapsed,
        "output_token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

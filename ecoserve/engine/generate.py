"""`ecoserve generate`: one completion from the offline engine, printed.

Imported whenever the `ecoserve` parser is built: the engine (and torch) only when it runs.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Everything but the model options (ecoserve.model.commands.add_model_arguments)."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ecoserve.engine.llm import LLM
    from ecoserve.params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    out = llm.generate([args.prompt], params, chat=args.chat)[0]
    print(out.text if args.chat else args.prompt + out.text)
    return 0

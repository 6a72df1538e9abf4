"""The options of `bench engine` and `bench kv-transfer`, apart from their modules, which import
torch at import time: the `ecoserve` parser builds every command, and `ecoserve sim` starts without torch."""

from __future__ import annotations

import argparse


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Everything but the model options (ecoserve.model.commands.add_model_arguments)."""
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-output-len", type=int, default=None, help="clip outputs further (default: the context only)")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="drop pairs with longer prompts (vLLM's filter)")
    p.add_argument("--max-total-len", type=int, default=2048, help="drop pairs whose prompt + reply is longer (vLLM's filter)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="static batch size of the transformers baseline; max_num_seqs of ours (and of vLLM's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="per-step token budget of ours (and of vLLM's)")
    p.add_argument("--against", default="transformers", choices=["transformers", "vllm"],
                   help="the baseline: transformers generate in this process, or vLLM's offline engine in --vllm-python "
                   "(then every dtype of --dtype, or float32 and bfloat16 for auto)")
    p.add_argument("--vllm-python", default=None, help="python of a virtual environment with vllm installed (--against vllm)")
    p.add_argument("--rounds", type=int, default=1,
                   help="--against vllm: runs of each side per dtype, in turns (vLLM first, then ours first, ...); "
                   "the table gives medians and the ratio's range over the pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true", help="only run EcoServe's engine")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def add_kv_transfer_arguments(p: argparse.ArgumentParser) -> None:
    from ecoserve.kv_transfer.types import DEFAULT_GROUP_BLOCKS

    p.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--repeats", type=int, default=10, help="timed iterations per path")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--group-blocks", type=int, default=DEFAULT_GROUP_BLOCKS, help="blocks per message")
    p.add_argument("--poll-sleep-us", type=float, default=50.0, help="sleep between the worker's polls (0: spin)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench_kv_transfer.json")

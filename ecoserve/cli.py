"""The `ecoserve` command: a table of commands.

    ecoserve generate --model M --prompt TEXT [--chat] --max-tokens N --temperature T
    ecoserve model prepare NAME | ecoserve model list
    ecoserve bench engine --model M --num-requests N --out FILE.json
    ecoserve serve --model M --prefill P --decode D [--mixed K] --policy distserve --port 5555
    ecoserve serve --engine sim [--sim-profile NAME|PATH] [--sim-time-scale X] --prefill 8 --decode 8
    ecoserve bench kv-transfer --prompt-lens 512 4096 --out FILE.json
    ecoserve bench scheduler --queued 1000,10000,100000 --running 1000 --out FILE.json
    ecoserve bench sim-fidelity --policy distserve --num-requests 40 --rate 0.25 --out FILE.json
    ecoserve bench live-vs-sim --rates 0.5,1,2 --num-requests 30 --out FILE.json --plot FILE.png
    ecoserve bench serve --addr ADDR --workload azure-conv --num-requests N --rate R --out FILE.json
    ecoserve bench soak --duration S [--engine sim|model] [--kill-every S] [--out FILE.json]
    ecoserve demo
    ecoserve keys generate --out DIR [--client NAME]    (then serve --auth curve --keys DIR)
    ecoserve profile --model M --out FILE.json [--quick] [--max-batch N] [--max-len N] [--repeats N]
    ecoserve predictor train --out DIR [--limit N] [--seed S] | ecoserve predictor eval [--model DIR] [--out FILE.json]

Each command's module registers its own options. `build_parser()` builds every command, so the
modules named under `arguments` are imported then and import no torch at import time (`ecoserve
sim` starts without it); a command's `run` module is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NamedTuple, Sequence

Run = Callable[[argparse.Namespace], int]


class Command(NamedTuple):
    path: str  # the words after `ecoserve`: "bench serve"
    help: str
    arguments: tuple[str, ...]  # "module:function"s that add its options, in order
    run: str  # "module:function", (args) -> exit code


MODEL = "ecoserve.model.commands:add_model_arguments"  # --model, --dtype, --device
SIM = "ecoserve.sim.commands"

# Commands with subcommands: their help (each keeps its choice in args.<name>_command).
GROUPS = {
    "model": "prepare or list models",
    "keys": "CURVE keys for --auth curve",
    "bench": "benchmarks",
    "predictor": "train or evaluate the learned response-length predictor (ShareGPT)",
}

COMMANDS = (
    Command("generate", "generate a completion offline and print it",
            (MODEL, "ecoserve.engine.generate:add_arguments"), "ecoserve.engine.generate:run"),
    Command("model prepare", "build a built-in model (or check a folder) into the cache",
            ("ecoserve.model.commands:add_prepare_arguments",), "ecoserve.model.commands:run_prepare"),
    Command("model list", "list built-in models", (), "ecoserve.model.commands:run_list"),
    Command("keys generate", "write the server's key pair (once) and a client's, and authorize the client",
            ("ecoserve.auth:add_keys_arguments",), "ecoserve.auth:run_keys_generate"),
    Command("bench engine", "offline throughput: EcoServe's engine against transformers generate or vLLM (--against vllm)",
            (MODEL, "ecoserve.bench.args:add_engine_arguments"), "ecoserve.bench.engine:run_engine_benchmark"),
    Command("sim", "one run on the discrete-event simulator: the DESIGN §8 metric table",
            (f"{SIM}:add_sim_arguments",), f"{SIM}:run_sim"),
    Command("bench compare-distserve", "fewest GPUs per policy for a target rate at the SLOs (simulated), with plots",
            (f"{SIM}:add_compare_distserve_arguments",), f"{SIM}:run_compare_distserve"),
    Command("bench compare-vllm", "on one GPU count: goodput, JCT and attainment per policy (simulated), with plots",
            (f"{SIM}:add_compare_vllm_arguments",), f"{SIM}:run_compare_vllm"),
    Command("bench results", "every simulated comparison into one Markdown file (docs/results.md)",
            (f"{SIM}:add_results_arguments",), "ecoserve.sim.results:run_results"),
    Command("bench kv-transfer", "paged KV transfer between two ranks against a bare send/recv",
            ("ecoserve.bench.args:add_kv_transfer_arguments",), "ecoserve.bench.kv_transfer:run_kv_transfer_benchmark"),
    Command("bench coordinator", "the coordinator's own cost with many requests in flight",
            ("ecoserve.bench.coordinator:add_arguments",), "ecoserve.bench.coordinator:run_coordinator_benchmark"),
    Command("bench serve", "open-loop load on a running server: latency, SLO attainment, goodput",
            ("ecoserve.bench.serve.run:add_arguments",), "ecoserve.bench.serve.run:run_serve_benchmark"),
    Command("bench soak", "sustained load on a local cluster while workers are killed: lost requests, leaked blocks, memory",
            ("ecoserve.bench.soak:add_arguments",), "ecoserve.bench.soak:run_soak_benchmark"),
    Command("bench scheduler", "one scheduling round's decision time per policy, no sockets",
            ("ecoserve.bench.scheduler:add_arguments",), "ecoserve.bench.scheduler:run_scheduler_benchmark"),
    Command("bench sim-fidelity", "the simulator's TTFT/TPOT against the real cluster on the same requests",
            ("ecoserve.bench.fidelity.run:add_arguments",), "ecoserve.bench.fidelity.run:run_fidelity"),
    Command("bench live-vs-sim", "ecoserve, distserve and vllm on two workers each, live and simulated: attainment, "
            "goodput, JCT, and whether the simulator ranks them alike",
            ("ecoserve.bench.fidelity.policies:add_arguments",), "ecoserve.bench.fidelity.policies:run_live_vs_sim"),
    Command("serve", "serve with a coordinator and prefill/decode (or mixed) workers on this machine",
            ("ecoserve.serve:add_arguments", "ecoserve.serve:add_http_arguments"), "ecoserve.serve:run_serve"),
    Command("launch", "run this node's part of a cluster spread over several machines (start it once per node)",
            ("ecoserve.serve:add_arguments", "ecoserve.serve:add_http_arguments", "ecoserve.multinode:add_arguments"),
            "ecoserve.serve:run_launch"),
    Command("demo", "the main job: a local 1 prefill + 1 decode cluster serving a slice of a real trace",
            (MODEL, "ecoserve.demo.cluster:add_arguments"), "ecoserve.demo.cluster:main_entry"),
    Command("profile", "fit a DistServe-form latency profile of our engine on this machine (for the simulator)",
            (MODEL, "ecoserve.bench.profile:add_arguments"), "ecoserve.bench.profile:run_profile"),
    Command("predictor train", "fit and compare candidates; save the best torch-free one to --out",
            ("ecoserve.predictor.training.train:add_arguments",), "ecoserve.predictor.training.train:run_train"),
    Command("predictor eval", "test-set figures of a trained predictor next to baselines and anchors",
            ("ecoserve.predictor.training.eval:add_arguments",), "ecoserve.predictor.training.eval:run_eval"),
)


def _resolve(ref: str) -> Callable[..., int]:
    module, _, name = ref.partition(":")
    fn: Callable[..., int] = getattr(importlib.import_module(module), name)
    return fn


def _runner(ref: str) -> Run:
    """`ref`'s function, its module imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return _resolve(ref)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecoserve", description="EcoServe LLM serving")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for cmd in COMMANDS:
        *parents, name = cmd.path.split()
        sub = top
        if parents:
            (group,) = parents
            if group not in groups:
                groups[group] = top.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command", required=True
                )
            sub = groups[group]
        p = sub.add_parser(name, help=cmd.help)
        for ref in cmd.arguments:
            _resolve(ref)(p)
        p.set_defaults(func=_runner(cmd.run))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ecoserve.envs import set_offline_hub

    set_offline_hub()
    args = build_parser().parse_args(argv)
    func: Run = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ecoserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

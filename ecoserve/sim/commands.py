"""The simulator's commands: `ecoserve sim`, `bench compare-distserve`, `bench compare-vllm` (their
work is in `compare.py`) and `bench results` (`results.py`): their options and entry points."""

from __future__ import annotations

import argparse
from typing import Any

from ecoserve.config import parse_option


POLICIES_HELP = "comma-separated policy specs, name[:option]: ecoserve, distserve, vllm, vllm:prefill-priority, orca"


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, "--model")
    p.add_argument("--policy", default="ecoserve", metavar="SPEC",
                   help="ecoserve, distserve, vllm or orca, with make_policy options as name:option (vllm:prefill-priority)")
    for role in ("prefill", "decode", "mixed"):
        p.add_argument(f"--{role}", type=int, default=None, help=f"{role} instances")
        p.add_argument(f"--tp-{role}", type=int, default=1, help=f"tensor-parallel degree of each {role} instance")
    p.add_argument("--rate", type=float, default=None, help="Poisson rate (req/s); Azure traces: their own times if absent")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--out", default=None, help="write the metrics as JSON here")


def add_compare_distserve_arguments(p: argparse.ArgumentParser) -> None:
    _add_compare_common(p)
    p.add_argument("--rate", type=float, required=True, help="the target request rate (req/s)")
    p.add_argument("--max-gpus", type=int, default=32)
    p.add_argument("--policies", default="ecoserve,distserve", help=POLICIES_HELP)


def add_compare_vllm_arguments(p: argparse.ArgumentParser) -> None:
    _add_compare_common(p)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--policies", default="ecoserve,vllm,vllm:prefill-priority,orca,distserve", help=POLICIES_HELP)
    p.add_argument("--points", type=int, default=6, help="rates in the sweep")
    p.add_argument("--rel-tol", type=float, default=0.05)


def add_results_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--num-requests", type=int, default=1000, help="requests per simulated run (at least)")
    p.add_argument("--min-duration-s", type=float, default=120.0, help="arrivals span at least this long")
    p.add_argument("--vllm-gpus", type=int, default=4)
    p.add_argument("--jobs", type=int, default=1, help="searches run on this many processes at once (same figures)")
    p.add_argument("--vllm-policies", default="ecoserve,distserve,vllm,vllm:prefill-priority,orca", help=POLICIES_HELP)
    p.add_argument("--predictors", default="oracle,histogram,learned")
    p.add_argument("--seed", type=int, default=0)
    _add_seed_count(p)
    _add_link(p)
    _add_max_tokens(p)
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where finished searches are kept so an interrupted run resumes (default "
                   "$ECOSERVE_HOME/results-cache); an entry is reused only with equal arguments and unchanged "
                   "simulator sources and data")
    p.add_argument("--no-cache", action="store_true", help="compute every search afresh and keep nothing")
    p.add_argument("--quick", action="store_true", help="a small smoke version (tests)")
    p.add_argument("--quiet", action="store_true")


def _add_compare_common(p: argparse.ArgumentParser) -> None:
    _add_common(p, "--profile")
    p.add_argument("--num-requests", type=int, default=1000, help="requests per simulated run (at least)")
    p.add_argument("--min-duration-s", type=float, default=120.0, help="arrivals span at least this long")
    p.add_argument("--out", required=True, metavar="DIR")
    _add_seed_count(p)


def _add_seed_count(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed: each search and sweep runs "
                   "once per seed; tables give mean (min-max)")


def _add_link(p: argparse.ArgumentParser) -> None:
    from ecoserve.sim.instance import HardwareConfig

    p.add_argument("--link-gbs", type=float, default=HardwareConfig().link_bytes_per_s / 1e9, metavar="GB_S",
                   help="KV transfer link, GB/s (gigabytes) per GPU, prefill -> decode")


def _add_max_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", default="context", type=_max_tokens, metavar="context|trace|N",
                   help="the max_tokens each simulated client sends: context (default: the context limit less "
                   "the prompt, as DistServe's and vLLM's benchmarks do), trace (the trace's own output length: "
                   "the true length leaks to every policy, kept only to reproduce older figures) or a number")


def _max_tokens(text: str) -> str | int:
    if text in ("context", "trace"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be context, trace or a whole number >= 1, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser, profile_flag: str) -> None:
    """Options every simulator command shares (`profile_flag`: --model or --profile)."""
    from ecoserve.sim.workloads import WORKLOADS

    p.add_argument(profile_flag, dest="profile" if profile_flag == "--profile" else "model", default="opt-13b",
                   help="the latency profile family (opt-13b, opt-66b) or a profile .json from `ecoserve profile`")
    p.add_argument("--workload", default="sharegpt", choices=WORKLOADS)
    p.add_argument("--slo-ttft-ms", type=float, default=250.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--predictor", default=None, help="ecoserve's length predictor (default: oracle in the simulator)")
    p.add_argument("--policy-option", action="append", default=[], metavar="K=V",
                   help="a policy option: ecoserve's knobs (margin=0.1, pipelining=false, ...); vllm's mode=prefill-priority")
    p.add_argument("--seed", type=int, default=0)
    _add_link(p)
    _add_max_tokens(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The ecoserve policy's options from --policy-option and --predictor."""
    opts = dict(parse_option(o) for o in (args.policy_option or []))
    if args.predictor is not None:
        opts["predictor"] = args.predictor
    return opts


def run_sim(args: argparse.Namespace) -> int:
    from ecoserve.sim.compare import run_sim

    return run_sim(args, _options(args))


def run_compare_distserve(args: argparse.Namespace) -> int:
    from ecoserve.sim.compare import compare_distserve

    compare_distserve(args, _options(args))
    return 0


def run_compare_vllm(args: argparse.Namespace) -> int:
    from ecoserve.sim.compare import compare_vllm

    compare_vllm(args, _options(args))
    return 0


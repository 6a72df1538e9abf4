"""`ecoserve serve` (one machine) and `ecoserve launch` (one node of several): the options they
share and the configs they build from them.

Imported whenever the `ecoserve` parser is built, so nothing here imports torch at import time;
`launch`'s own options are in `ecoserve.multinode`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoserve import envs
from ecoserve.config import CacheConfig, CoordinatorConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_option
from ecoserve.model.commands import add_model_arguments

if TYPE_CHECKING:
    from ecoserve.launcher import ClusterSpec
    from ecoserve.openai_api.process import HttpSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    """What `serve` and `launch` share."""
    add_model_arguments(p)
    p.set_defaults(model=None)  # smollm2-135m; tiny-llama with --engine sim
    p.add_argument(
        "--engine", default="model", choices=["model", "sim"],
        help="model (default) runs the weights; sim is a load-test tool: workers model step times from "
        "--sim-profile and emit deterministic tokens, with the real coordinator, KV pool and KV transfer",
    )
    p.add_argument(
        "--sim-profile", default="opt-13b-tp1", metavar="NAME|PATH",
        help="--engine sim: a DistServe A100 latency profile (opt-13b-tp1/2/4, opt-66b-tp2/3/4/8, or vllm-<those>) "
        "or a profile JSON file; the KV pool holds its measured capacity unless --num-blocks is given",
    )
    p.add_argument(
        "--sim-time-scale", type=float, default=1.0, help="--engine sim: multiply modelled step times (0: no waiting)"
    )
    # Counts default to None: `serve` reads None as 1 prefill + 1 decode (none with --mixed K),
    # `launch` as none on this node.
    p.add_argument("--prefill", type=int, default=None, help="prefill workers (serve: default 1, or 0 with --mixed K)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (serve: default 1, or 0 with --mixed K)")
    p.add_argument(
        "--mixed", type=int, default=None,
        help="mixed workers (prefill and decode in one, colocated); with --prefill P, prefill workers send them KV",
    )
    _add_policy_arguments(p)
    _add_front_door_arguments(p)
    _add_worker_arguments(p)


def _add_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy", default="distserve",
        help="ecoserve or distserve (prefill + decode workers; distserve also mixed), vllm or orca (mixed workers)",
    )
    p.add_argument(
        "--predictor", default=None,
        help="response-length predictor for --policy ecoserve: histogram (default), fixed, learned (trained on "
        "ShareGPT; docs/predictor.md); oracle and oracle-noisy know true lengths only for ignore_eos requests",
    )
    p.add_argument("--predictor-option", action="append", metavar="KEY=VALUE", help="e.g. quantile=0.9, length=64, path=DIR")
    p.add_argument(
        "--latency-profile", default=None, metavar="NAME|FILE",
        help="--policy ecoserve: the workers' step-time profile (a bundled name, e.g. cpu-smollm2-135m, or a file "
        "from `ecoserve profile`): its mixed workers budget each step's prompt tokens by it (the slo schedule) and "
        "the policy's cost model reads it. Default: the --sim-profile with --engine sim; cpu-smollm2-135m for "
        "smollm2-135m on the CPU; otherwise required with mixed workers",
    )
    p.add_argument(
        "--policy-option", action="append", metavar="KEY=VALUE",
        help="ecoserve knobs, e.g. margin=0.1, pipelining=false, rl_buckets=false, ordering=false, "
        "exact_allocation=false, preempt_mode=swap, buckets=[32,64,128]",
    )


def _add_front_door_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="client address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=5555, help="client port; 0 picks a free one")
    p.add_argument(
        "--auth", default="none", choices=["none", "curve"],
        help="client socket security: curve encrypts and admits only the client keys in --keys DIR/authorized_clients",
    )
    p.add_argument("--keys", default=None, metavar="DIR", help="--auth curve: a folder made by `ecoserve keys generate`")
    p.add_argument(
        "--max-inflight-per-client", type=int, default=None, metavar="N",
        help="requests one client connection may have in flight (default 65536); more get an over_limit error",
    )
    p.add_argument(
        "--max-prompt-tokens-per-client", type=int, default=None, metavar="N",
        help="prompt tokens one client connection may have in flight (default 16777216)",
    )


def add_http_arguments(p: argparse.ArgumentParser) -> None:
    """The OpenAI-compatible HTTP front door and Prometheus metrics, in a process of their own
    (DESIGN §10): `serve`, and node 0 of `launch`."""
    p.add_argument(
        "--http-port", type=int, default=None, metavar="PORT",
        help="also serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) over HTTP on "
        "--host:PORT, from a process of its own that stops with the cluster; 0 picks a free port",
    )
    p.add_argument(
        "--api-key", default=None, metavar="KEY",
        help="--http-port: require 'Authorization: Bearer KEY' on /v1 (default: the ECOSERVE_API_KEY "
        "environment variable, else no key)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help="serve Prometheus /metrics alone on --host:PORT (with --http-port, /metrics is also there); "
        "0 picks a free port",
    )


def _add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: from --kv-cache-gib)")
    p.add_argument("--gpu-memory-fraction", type=float, default=None, help="KV pool = this share of free GPU memory (CUDA)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV pool size per worker (when neither of the above)")
    p.add_argument(
        "--num-host-blocks", type=int, default=0,
        help="host-memory swap space per worker, in KV blocks (0: none; a swap preemption then recomputes)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="tokens per step (prefill budget)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0, help="seconds of silence before a worker is lost")
    p.add_argument("--transfer-deadline", type=float, default=60.0, help="seconds a KV transfer may take")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight work on shutdown")
    p.add_argument(
        "--max-retries", type=int, default=2,
        help="times a request is retried after its worker is lost or its KV transfer fails (0: fail at once)",
    )
    p.add_argument("--ready-file", default=None, help="write the client address here once every worker is up")


def run_serve(args: argparse.Namespace) -> int:
    from ecoserve.coordinator.policies import make_policy
    from ecoserve.coordinator.policy import check_cluster
    from ecoserve.launcher import run_async, run_cluster
    from ecoserve.model.registry import resolve_model

    spec = cluster_spec(args)
    engine, coord = engine_and_coordinator(args)
    check_cluster(make_policy(args.policy, **coord.policy_options), set(spec.roles()))
    http = http_spec(args)
    folder = resolve_model(args.model)  # prepares a built-in model once, before any worker starts
    if http is not None:
        http = dataclasses.replace(http, model_folder=str(folder))
    ready = Path(args.ready_file) if args.ready_file else None
    return run_async(run_cluster(spec, engine, coord, folder, args.threads_per_worker, ready, http))


def http_spec(args: argparse.Namespace) -> HttpSpec | None:
    """The HTTP front door `--http-port` and `--metrics-port` ask for, their ports checked free
    before anything starts (ValueError, one line, exit 2, when they are not)."""
    from ecoserve.openai_api.process import HttpSpec
    from ecoserve.openai_api.server import bind

    if args.http_port is None and args.api_key is not None:
        raise ValueError("--api-key protects the HTTP front door: give --http-port PORT with it")
    if args.http_port is None and args.metrics_port is None:
        return None
    for option, port in (("--http-port", args.http_port), ("--metrics-port", args.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"{option} must be a port number in [0, 65535] (0 picks a free one), got {port}")
    if args.http_port and args.http_port == args.metrics_port:
        raise ValueError(f"--metrics-port must differ from --http-port (both {args.http_port}); the OpenAI API's "
                         "port serves /metrics too")
    for option, port in (("--http-port", args.http_port), ("--metrics-port", args.metrics_port)):
        if port:
            try:
                bind(args.host, port, option).close()  # the HTTP process binds it again once the cluster is up
            except OSError as exc:
                raise ValueError(str(exc)) from None
    return HttpSpec(args.host, args.http_port, api_key=args.api_key or envs.api_key(), metrics_port=args.metrics_port)


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """`serve`'s workers: 1 prefill + 1 decode by default; with --mixed K, the counts not given are 0."""
    from ecoserve.launcher import ClusterSpec

    default = 0 if args.mixed else 1
    return ClusterSpec(_count(args.prefill, default), _count(args.decode, default), _count(args.mixed, 0))


def run_launch(args: argparse.Namespace) -> int:
    from ecoserve.multinode import run_launch

    args.prefill, args.decode, args.mixed = (_count(v, 0) for v in (args.prefill, args.decode, args.mixed))
    engine, coord = engine_and_coordinator(args)
    if args.node_rank != 0 and (args.http_port is not None or args.metrics_port is not None):
        raise ValueError(f"--http-port and --metrics-port are node 0's (it runs the coordinator); node {args.node_rank} "
                         "takes neither")
    return run_launch(args, engine, coord, http_spec(args))


def _count(value: int | None, default: int) -> int:
    return default if value is None else value


def engine_and_coordinator(args: argparse.Namespace) -> tuple[EngineConfig, CoordinatorConfig]:
    """The EngineConfig every worker gets and the CoordinatorConfig, from serve/launch options.
    The workers' local schedule is the policy's (`--policy vllm --policy-option
    mode=prefill-priority`: mixed workers run whole prompts first; prefill and decode workers
    see no difference)."""
    from ecoserve.coordinator.policies import make_policy

    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise ValueError(
            f"--threads-per-worker must be >= 1 (or omitted: this machine's cores / workers), got {args.threads_per_worker}"
        )
    options = policy_options(args)
    schedule = make_policy(args.policy, **options).mixed_schedule  # bad options refused here, before anything starts
    if args.model is None:  # the sim engine reads only a vocabulary and a tokenizer: the tiny model's
        args.model = "tiny-llama" if args.engine == "sim" else "smollm2-135m"
    if schedule == "slo" and not args.mixed:
        schedule = "chunked"  # the policy's mixed-worker schedule; with none here, no worker runs it
    profile = latency_profile(args, schedule)
    if profile is not None and args.policy == "ecoserve" and "costs" not in options:  # the policy's cost model reads what the workers do
        options["costs"] = cost_model(profile)
    engine = EngineConfig(
        model=ModelConfig(
            model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
            engine=args.engine, sim_profile=args.sim_profile, sim_time_scale=args.sim_time_scale,
        ),
        cache=CacheConfig(
            block_size=args.block_size, num_blocks=args.num_blocks, gpu_memory_fraction=args.gpu_memory_fraction,
            kv_cache_gib=args.kv_cache_gib, num_host_blocks=args.num_host_blocks,
        ),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  schedule=schedule, latency_profile=profile if schedule == "slo" else None),
    )
    coord = CoordinatorConfig(
        host=args.host, port=args.port, policy=args.policy, policy_options=options,
        heartbeat_timeout_s=args.heartbeat_timeout,
        transfer_deadline_s=args.transfer_deadline, drain_timeout_s=args.drain_timeout, max_retries=args.max_retries,
    )
    return engine, _with_security(coord, args)


def latency_profile(args: argparse.Namespace, schedule: str) -> str | None:
    """The step-time profile of the workers (`--latency-profile`), checked: what the slo schedule
    budgets by and the ecoserve policy's cost model reads; None where nothing reads one. Without
    the option, a profile that describes what will run: with --engine sim, the --sim-profile its
    workers model their steps by (exact); for smollm2-135m on the CPU, the bundled fit of that
    model (`cpu-smollm2-135m`, measured on a 2-core machine). Any other model has no fit to
    default to: the slo schedule then needs the option (ValueError, one line)."""
    from ecoserve.latency.profile import FITTED_PROFILES, load_profile

    if args.latency_profile is not None:
        if args.policy != "ecoserve":
            raise ValueError(f"--latency-profile is read by --policy ecoserve only; --policy {args.policy} takes none")
        load_profile(args.latency_profile)  # ValueError naming the bundled profiles
        return str(args.latency_profile)
    if schedule != "slo":
        return None
    if args.engine == "sim":
        return str(args.sim_profile)
    if args.model == "smollm2-135m" and _on_cpu(args.device):
        return "cpu-smollm2-135m"
    raise ValueError(
        f"--policy {args.policy} runs the slo schedule on mixed workers, which needs --latency-profile NAME|FILE: "
        f"there is no bundled fit of {args.model} on {args.device} (bundled: {', '.join(FITTED_PROFILES)} for "
        f"smollm2-135m on the CPU); fit one with `ecoserve profile --model {args.model}`"
    )


def _on_cpu(device: str) -> bool:
    if device == "auto":
        import torch  # only here: serve's parser and coordinator need no torch

        return not torch.cuda.is_available()
    return device == "cpu"


def cost_model(profile: str) -> Any:
    """The ecoserve policy's cost model for workers with `profile` (CostModel.from_profile)."""
    from ecoserve.latency.cost import CostModel
    from ecoserve.latency.profile import load_profile

    prof, default = load_profile(profile), CostModel()
    return CostModel.from_profile(prof, prof.kv_bytes_per_token or default.kv_bytes_per_token, default.swap_bytes_per_s)


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """make_policy's options from --predictor, --predictor-option and --policy-option."""
    options = dict(parse_option(o) for o in args.policy_option or [])
    if args.predictor is not None:
        options["predictor"] = args.predictor
    if args.predictor_option:
        options["predictor_options"] = dict(parse_option(o) for o in args.predictor_option)
    return options


def _with_security(coord: CoordinatorConfig, args: argparse.Namespace) -> CoordinatorConfig:
    """`coord` with --auth/--keys and the per-client limits; bad key files fail here, before anything starts."""
    from ecoserve.auth import load_server_keys

    limits = {
        "max_inflight_per_client": args.max_inflight_per_client,
        "max_prompt_tokens_per_client": args.max_prompt_tokens_per_client,
        "max_queued_bytes_per_client": envs.client_queue_bytes(),  # no option: an environment variable
    }
    coord = dataclasses.replace(coord, auth=args.auth, keys_dir=args.keys, **{k: v for k, v in limits.items() if v is not None})
    if coord.auth == "curve" and coord.keys_dir is not None:  # CoordinatorConfig holds them together
        load_server_keys(coord.keys_dir)  # KeyFileError (a ValueError): one line, exit 2
    return coord

"""The `ecoserve` command.

    ecoserve generate --model M --prompt TEXT [--chat] --max-tokens N --temperature T
    ecoserve model prepare NAME | ecoserve model list
    ecoserve bench engine --model M --num-requests N --out FILE.json
    ecoserve serve --model M --prefill P --decode D [--mixed K] --policy distserve --port 5555
    ecoserve serve --engine sim [--sim-profile NAME|PATH] [--sim-time-scale X] --prefill 8 --decode 8
    ecoserve bench kv-transfer --prompt-lens 512 4096 --out FILE.json
    ecoserve bench scheduler --queued 1000,10000,100000 --running 1000 --out FILE.json
    ecoserve bench sim-fidelity --policy distserve --num-requests 40 --rate 0.25 --out FILE.json
    ecoserve bench serve --addr ADDR --workload azure-conv --num-requests N --rate R --out FILE.json
    ecoserve bench soak --duration S [--engine sim|model] [--kill-every S] [--out FILE.json]
    ecoserve demo
    ecoserve keys generate --out DIR [--client NAME]    (then serve --auth curve --keys DIR)
    ecoserve profile --model M --out FILE.json [--quick] [--max-batch N] [--max-len N] [--repeats N]
    ecoserve predictor train --out DIR [--limit N] [--seed S] | ecoserve predictor eval [--model DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence


def _cmd_generate(args: argparse.Namespace) -> int:
    from ecoserve import LLM, SamplingParams

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


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from ecoserve.model.registry import BUILTIN_MODELS, prepare_model, resolve_model

    # A built-in is (re)built; anything else must be a usable local folder.
    path = prepare_model(args.name, force=args.force) if args.name in BUILTIN_MODELS else resolve_model(args.name)
    print(path)
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    from ecoserve.model.registry import BUILTIN_MODELS

    for name, model in BUILTIN_MODELS.items():
        print(f"{name:14s} {model.description}")
    return 0


def _cmd_bench_engine(args: argparse.Namespace) -> int:
    from ecoserve.bench.engine import run_engine_benchmark

    return run_engine_benchmark(args)


def _engine_and_coordinator(args: argparse.Namespace) -> tuple[Any, Any]:
    """The EngineConfig every worker gets and the CoordinatorConfig, from serve/launch options."""
    from ecoserve.config import CacheConfig, CoordinatorConfig, EngineConfig, ModelConfig, SchedulerConfig

    if args.model is None:  # the sim engine reads only a vocabulary and a tokenizer: the tiny model's
        args.model = "tiny-llama" if args.engine == "sim" else "smollm2-135m"
    engine = EngineConfig(
        model=ModelConfig(
            model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
            engine=args.engine, sim_profile=args.sim_profile, sim_time_scale=args.sim_time_scale,
        ),
        cache=CacheConfig(
            block_size=args.block_size, num_blocks=args.num_blocks, gpu_memory_fraction=args.gpu_memory_fraction,
            kv_cache_gib=args.kv_cache_gib, num_host_blocks=args.num_host_blocks,
        ),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
    )
    coord = CoordinatorConfig(
        host=args.host, port=args.port, policy=args.policy, policy_options=policy_options(args),
        heartbeat_timeout_s=args.heartbeat_timeout,
        transfer_deadline_s=args.transfer_deadline, drain_timeout_s=args.drain_timeout, max_retries=args.max_retries,
    )
    return engine, _with_security(coord, args)


def _with_security(coord: Any, args: argparse.Namespace) -> Any:
    """`coord` with --auth/--keys and the per-client limits; bad key files fail here, before anything starts."""
    import dataclasses

    from ecoserve.auth import load_server_keys

    limits = {
        "max_inflight_per_client": args.max_inflight_per_client,
        "max_prompt_tokens_per_client": args.max_prompt_tokens_per_client,
    }
    coord = dataclasses.replace(coord, auth=args.auth, keys_dir=args.keys, **{k: v for k, v in limits.items() if v is not None})
    if coord.auth == "curve":
        load_server_keys(coord.keys_dir)  # KeyFileError (a ValueError): one line, exit 2
    return coord


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from ecoserve.auth import generate_keys

    for path in generate_keys(args.out, args.client):
        print(path)
    print(f"serve with --auth curve --keys {args.out}; give client {args.client!r} server.pub, {args.client}.pub and "
          f"{args.client}.key (Client(addr, auth_keys=DIR))")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ecoserve.coordinator.policies import make_policy
    from ecoserve.coordinator.policy import check_cluster
    from ecoserve.launcher import ClusterSpec, run_async, run_cluster
    from ecoserve.model.registry import resolve_model

    spec = ClusterSpec(_count(args.prefill, 1), _count(args.decode, 1), _count(args.mixed, 0))
    engine, coord = _engine_and_coordinator(args)
    check_cluster(make_policy(args.policy, **coord.policy_options), set(spec.roles()))
    folder = resolve_model(args.model)  # prepares a built-in model once, before any worker starts
    ready = Path(args.ready_file) if args.ready_file else None
    return run_async(run_cluster(spec, engine, coord, folder, args.threads_per_worker, ready))


def _count(value: int | None, default: int) -> int:
    return default if value is None else value


def _cmd_launch(args: argparse.Namespace) -> int:
    from ecoserve.multinode import run_launch

    args.prefill, args.decode, args.mixed = (_count(v, 0) for v in (args.prefill, args.decode, args.mixed))
    engine, coord = _engine_and_coordinator(args)
    return run_launch(args, engine, coord)


def _parse_option(text: str) -> tuple[str, Any]:
    """`key=value`: the value as JSON when it parses (numbers, true/false, lists), else a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"an option must look like key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """make_policy's options from --predictor, --predictor-option and --policy-option."""
    options = dict(_parse_option(o) for o in args.policy_option or [])
    if args.predictor is not None:
        options["predictor"] = args.predictor
    if args.predictor_option:
        options["predictor_options"] = dict(_parse_option(o) for o in args.predictor_option)
    return options


def _cmd_bench_coordinator(args: argparse.Namespace) -> int:
    from ecoserve.bench.coordinator import run_coordinator_benchmark

    return run_coordinator_benchmark(args)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from ecoserve.bench.serve.run import run_serve_benchmark

    return run_serve_benchmark(args)


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from ecoserve.bench.soak import run_soak_benchmark

    return run_soak_benchmark(args)


def _cmd_bench_kv_transfer(args: argparse.Namespace) -> int:
    from ecoserve.bench.kv_transfer import run_kv_transfer_benchmark

    return run_kv_transfer_benchmark(args)


def _cmd_bench_scheduler(args: argparse.Namespace) -> int:
    from ecoserve.bench.scheduler import run_scheduler_benchmark

    return run_scheduler_benchmark(args)


def _cmd_bench_sim_fidelity(args: argparse.Namespace) -> int:
    from ecoserve.bench.fidelity.run import run_fidelity

    return run_fidelity(args)


def _cmd_profile(args: argparse.Namespace) -> int:
    from ecoserve.bench.profile import run_profile

    return run_profile(args)


def _cmd_predictor_train(args: argparse.Namespace) -> int:
    from ecoserve.predictor.training.train import run_train

    return run_train(args)


def _cmd_predictor_eval(args: argparse.Namespace) -> int:
    from ecoserve.predictor.training.eval import run_eval

    return run_eval(args)


def _sim_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = dict(_parse_option(o) for o in (args.policy_option or []))
    if args.predictor is not None:
        opts["predictor"] = args.predictor
    return opts


def _cmd_sim(args: argparse.Namespace) -> int:
    from ecoserve.sim.compare import run_sim

    return run_sim(args, _sim_options(args))


def _cmd_compare(args: argparse.Namespace) -> int:
    from ecoserve.sim import compare

    fn = compare.compare_distserve if args.bench_command == "compare-distserve" else compare.compare_vllm
    fn(args, _sim_options(args))
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from ecoserve.sim.results import run_results

    return run_results(args)


def _add_sim_args(p: argparse.ArgumentParser, profile_flag: str) -> None:
    """Arguments every simulator command shares (`profile_flag`: --model or --profile)."""
    from ecoserve.sim.workloads import WORKLOADS

    p.add_argument(profile_flag, dest="profile" if profile_flag == "--profile" else "model", default="opt-13b",
                   help="the latency profile family (opt-13b, opt-66b) or a profile .json from `ecoserve profile`")
    p.add_argument("--workload", default="sharegpt", choices=WORKLOADS)
    p.add_argument("--slo-ttft-ms", type=float, default=250.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--predictor", default=None, help="ecoserve's length predictor (default: oracle in the simulator)")
    p.add_argument("--policy-option", action="append", default=[], metavar="K=V", help="an ecoserve policy option")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ecoserve.demo.cluster import main_entry

    return main_entry(args)


def _add_kv_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    from ecoserve.kv_transfer.types import DEFAULT_GROUP_BLOCKS

    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--repeats", type=int, default=10, help="timed iterations per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--group-blocks", type=int, default=DEFAULT_GROUP_BLOCKS, help="blocks per message")
    parser.add_argument("--poll-sleep-us", type=float, default=50.0, help="sleep between the worker's polls (0: spin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/bench_kv_transfer.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecoserve", description="EcoServe LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion offline and print it")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_cmd_generate)

    model = sub.add_parser("model", help="prepare or list models").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="build a built-in model (or check a folder) into the cache")
    prep.add_argument("name")
    prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prep.set_defaults(func=_cmd_model_prepare)
    model.add_parser("list", help="list built-in models").set_defaults(func=_cmd_model_list)

    keys = sub.add_parser("keys", help="CURVE keys for --auth curve").add_subparsers(dest="keys_command", required=True)
    kgen = keys.add_parser("generate", help="write the server's key pair (once) and a client's, and authorize the client")
    kgen.add_argument("--out", required=True, metavar="DIR", help="the key folder (created if missing)")
    kgen.add_argument("--client", default="client", metavar="NAME", help="the client pair's name: NAME.key, NAME.pub")
    kgen.set_defaults(func=_cmd_keys_generate)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    eng = bench.add_parser("engine", help="offline throughput: EcoServe's engine against transformers generate")
    _add_model_args(eng)
    eng.add_argument("--num-requests", type=int, default=64)
    eng.add_argument("--max-output-len", type=int, default=None, help="clip outputs further (default: the context only)")
    eng.add_argument("--max-prompt-len", type=int, default=1024, help="drop pairs with longer prompts (vLLM's filter)")
    eng.add_argument("--max-total-len", type=int, default=2048, help="drop pairs whose prompt + reply is longer (vLLM's filter)")
    eng.add_argument("--batch-size", type=int, default=32, help="static batch size of the baseline, max_num_seqs of ours")
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--skip-baseline", action="store_true", help="only run EcoServe's engine")
    eng.add_argument("--out", default=None, help="write the results as JSON here")
    eng.set_defaults(func=_cmd_bench_engine)

    simp = sub.add_parser("sim", help="one run on the discrete-event simulator: the DESIGN §8 metric table")
    _add_sim_args(simp, "--model")
    simp.add_argument("--policy", default="ecoserve", choices=["ecoserve", "distserve", "vllm", "orca"])
    for role in ("prefill", "decode", "mixed"):
        simp.add_argument(f"--{role}", type=int, default=None, help=f"{role} instances")
        simp.add_argument(f"--tp-{role}", type=int, default=1, help=f"tensor-parallel degree of each {role} instance")
    simp.add_argument("--rate", type=float, default=None, help="Poisson rate (req/s); Azure traces: their own times if absent")
    simp.add_argument("--num-requests", type=int, default=1000)
    simp.add_argument("--out", default=None, help="write the metrics as JSON here")
    simp.set_defaults(func=_cmd_sim)

    for name, helptext in (
        ("compare-distserve", "fewest GPUs per policy for a target rate at the SLOs (simulated), with plots"),
        ("compare-vllm", "on one GPU count: goodput, JCT and attainment per policy (simulated), with plots"),
    ):
        cmp_ = bench.add_parser(name, help=helptext)
        _add_sim_args(cmp_, "--profile")
        cmp_.add_argument("--num-requests", type=int, default=1000, help="requests per simulated run (at least)")
        cmp_.add_argument("--min-duration-s", type=float, default=120.0, help="arrivals span at least this long")
        cmp_.add_argument("--out", required=True, metavar="DIR")
        if name == "compare-distserve":
            cmp_.add_argument("--rate", type=float, required=True, help="the target request rate (req/s)")
            cmp_.add_argument("--max-gpus", type=int, default=32)
            cmp_.add_argument("--policies", default="ecoserve,distserve")
        else:
            cmp_.add_argument("--gpus", type=int, default=4)
            cmp_.add_argument("--policies", default="ecoserve,vllm,orca,distserve")
            cmp_.add_argument("--points", type=int, default=6, help="rates in the sweep")
            cmp_.add_argument("--rel-tol", type=float, default=0.05)
        cmp_.set_defaults(func=_cmd_compare)

    res = bench.add_parser("results", help="every simulated comparison into one Markdown file (docs/results.md)")
    res.add_argument("--out", default="docs/results.md")
    res.add_argument("--num-requests", type=int, default=300, help="requests per simulated run (at least)")
    res.add_argument("--min-duration-s", type=float, default=45.0, help="arrivals span at least this long")
    res.add_argument("--max-gpus", type=int, default=16)
    res.add_argument("--vllm-gpus", type=int, default=4)
    res.add_argument("--predictors", default="oracle,histogram,learned")
    res.add_argument("--seed", type=int, default=0)
    res.add_argument("--quick", action="store_true", help="a small smoke version (tests)")
    res.add_argument("--quiet", action="store_true")
    res.set_defaults(func=_cmd_results)

    kvt = bench.add_parser("kv-transfer", help="paged KV transfer between two ranks against a bare send/recv")
    _add_kv_transfer_arguments(kvt)  # here: the benchmark's module imports torch, which `sim` does without
    kvt.set_defaults(func=_cmd_bench_kv_transfer)

    crd = bench.add_parser("coordinator", help="the coordinator's own cost with many requests in flight")
    from ecoserve.bench.coordinator import add_arguments as add_coordinator_arguments

    add_coordinator_arguments(crd)
    crd.set_defaults(func=_cmd_bench_coordinator)

    bsv = bench.add_parser("serve", help="open-loop load on a running server: latency, SLO attainment, goodput")
    from ecoserve.bench.serve.run import add_arguments as add_serve_arguments

    add_serve_arguments(bsv)
    bsv.set_defaults(func=_cmd_bench_serve)

    soak = bench.add_parser("soak", help="sustained load on a local cluster while workers are killed: lost requests, leaked blocks, memory")
    from ecoserve.bench.soak import add_arguments as add_soak_arguments

    add_soak_arguments(soak)
    soak.set_defaults(func=_cmd_bench_soak)

    sch = bench.add_parser("scheduler", help="one scheduling round's decision time per policy, no sockets")
    from ecoserve.bench.scheduler import add_arguments as add_scheduler_arguments

    add_scheduler_arguments(sch)
    sch.set_defaults(func=_cmd_bench_scheduler)

    fid = bench.add_parser("sim-fidelity", help="the simulator's TTFT/TPOT against the real cluster on the same requests")
    from ecoserve.bench.fidelity.run import add_arguments as add_fidelity_arguments

    add_fidelity_arguments(fid)
    fid.set_defaults(func=_cmd_bench_sim_fidelity)

    # What `serve` (one machine) and `launch` (one node of several) share.
    serving = argparse.ArgumentParser(add_help=False)
    _add_model_args(serving)
    serving.set_defaults(model=None)  # smollm2-135m; tiny-llama with --engine sim
    serving.add_argument(
        "--engine", default="model", choices=["model", "sim"],
        help="model (default) runs the weights; sim is a load-test tool: workers model step times from "
        "--sim-profile and emit deterministic tokens, with the real coordinator, KV pool and KV transfer",
    )
    serving.add_argument(
        "--sim-profile", default="opt-13b-tp1", metavar="NAME|PATH",
        help="--engine sim: a DistServe A100 latency profile (opt-13b-tp1/2/4, opt-66b-tp2/3/4/8, or vllm-<those>) "
        "or a profile JSON file; the KV pool holds its measured capacity unless --num-blocks is given",
    )
    serving.add_argument(
        "--sim-time-scale", type=float, default=1.0, help="--engine sim: multiply modelled step times (0: no waiting)"
    )
    # Counts default to None: `serve` reads None as 1 prefill + 1 decode, `launch` as none on this node.
    serving.add_argument("--prefill", type=int, default=None, help="prefill workers (serve: default 1; 0 with --decode 0 for mixed only)")
    serving.add_argument("--decode", type=int, default=None, help="decode workers (serve: default 1)")
    serving.add_argument("--mixed", type=int, default=None, help="mixed workers (prefill and decode in one, colocated)")
    serving.add_argument(
        "--policy", default="distserve",
        help="ecoserve or distserve (prefill + decode workers; distserve also mixed), vllm or orca (mixed workers)",
    )
    serving.add_argument(
        "--predictor", default=None,
        help="response-length predictor for --policy ecoserve: histogram (default), fixed, learned (trained on "
        "ShareGPT; docs/predictor.md); oracle and oracle-noisy know true lengths only for ignore_eos requests",
    )
    serving.add_argument("--predictor-option", action="append", metavar="KEY=VALUE", help="e.g. quantile=0.9, length=64, path=DIR")
    serving.add_argument(
        "--policy-option", action="append", metavar="KEY=VALUE",
        help="ecoserve knobs, e.g. margin=0.1, pipelining=false, rl_buckets=false, ordering=false, "
        "exact_allocation=false, preempt_mode=swap, buckets=[32,64,128]",
    )
    serving.add_argument("--host", default="127.0.0.1", help="client address to bind (default: this machine only)")
    serving.add_argument("--port", type=int, default=5555, help="client port; 0 picks a free one")
    serving.add_argument(
        "--auth", default="none", choices=["none", "curve"],
        help="client socket security: curve encrypts and admits only the client keys in --keys DIR/authorized_clients",
    )
    serving.add_argument("--keys", default=None, metavar="DIR", help="--auth curve: a folder made by `ecoserve keys generate`")
    serving.add_argument(
        "--max-inflight-per-client", type=int, default=None, metavar="N",
        help="requests one client connection may have in flight (default 65536); more get an over_limit error",
    )
    serving.add_argument(
        "--max-prompt-tokens-per-client", type=int, default=None, metavar="N",
        help="prompt tokens one client connection may have in flight (default 16777216)",
    )
    serving.add_argument("--block-size", type=int, default=16)
    serving.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: from --kv-cache-gib)")
    serving.add_argument("--gpu-memory-fraction", type=float, default=None, help="KV pool = this share of free GPU memory (CUDA)")
    serving.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV pool size per worker (when neither of the above)")
    serving.add_argument(
        "--num-host-blocks", type=int, default=0,
        help="host-memory swap space per worker, in KV blocks (0: none; a swap preemption then recomputes)",
    )
    serving.add_argument("--max-model-len", type=int, default=None)
    serving.add_argument("--max-num-seqs", type=int, default=256)
    serving.add_argument("--max-num-batched-tokens", type=int, default=1024, help="tokens per step (prefill budget)")
    serving.add_argument("--threads-per-worker", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    serving.add_argument("--heartbeat-timeout", type=float, default=30.0, help="seconds of silence before a worker is lost")
    serving.add_argument("--transfer-deadline", type=float, default=60.0, help="seconds a KV transfer may take")
    serving.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight work on shutdown")
    serving.add_argument(
        "--max-retries", type=int, default=2,
        help="times a request is retried after its worker is lost or its KV transfer fails (0: fail at once)",
    )
    serving.add_argument("--ready-file", default=None, help="write the client address here once every worker is up")
    serve = sub.add_parser(
        "serve", parents=[serving], help="serve with a coordinator and prefill/decode (or mixed) workers on this machine"
    )
    serve.set_defaults(func=_cmd_serve)

    launch = sub.add_parser(
        "launch", parents=[serving],
        help="run this node's part of a cluster spread over several machines (start it once per node)",
    )
    from ecoserve.multinode import add_arguments as add_launch_arguments

    add_launch_arguments(launch)
    launch.set_defaults(func=_cmd_launch)

    demo = sub.add_parser(
        "demo", help="the main job: a local 1 prefill + 1 decode cluster serving a slice of a real trace"
    )
    _add_model_args(demo)
    from ecoserve.demo.cluster import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    prof = sub.add_parser("profile", help="fit a DistServe-form latency profile of our engine on this machine (for the simulator)")
    _add_model_args(prof)
    from ecoserve.bench.profile import add_arguments as add_profile_arguments

    add_profile_arguments(prof)
    prof.set_defaults(func=_cmd_profile)

    pred = sub.add_parser("predictor", help="train or evaluate the learned response-length predictor (ShareGPT)")
    pred_sub = pred.add_subparsers(dest="predictor_command", required=True)
    from ecoserve.predictor.training.eval import add_arguments as add_predictor_eval_arguments
    from ecoserve.predictor.training.train import add_arguments as add_predictor_train_arguments

    ptrain = pred_sub.add_parser("train", help="fit and compare candidates; save the best torch-free one to --out")
    add_predictor_train_arguments(ptrain)
    ptrain.set_defaults(func=_cmd_predictor_train)
    peval = pred_sub.add_parser("eval", help="test-set figures of a trained predictor next to baselines and anchors")
    add_predictor_eval_arguments(peval)
    peval.set_defaults(func=_cmd_predictor_eval)
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local Hugging Face folder")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def main(argv: Sequence[str] | None = None) -> int:
    from ecoserve.envs import set_offline_hub

    set_offline_hub()
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ecoserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

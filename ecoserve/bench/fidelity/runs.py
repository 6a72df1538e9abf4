"""The two sides of `ecoserve bench sim-fidelity` (bench/fidelity.py): the settings both are
given, the request list, the real cluster's run and the simulator's."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ecoserve.bench.fidelity.cpu_share import CPUProbe, CPUTime, cpu_time, load_average
from ecoserve.data.workload import WorkloadRequest

BUNDLED = {"smollm2-135m": "cpu-smollm2-135m.json"}  # --model -> bundled profile file
# Paged gloo transfer between two ranks of this machine (`bench kv-transfer`, README): 18.3 ms
# for 23.6 MB (512 tokens of SmolLM2-135M KV), 65.7 ms for 188.7 MB (4,096): a line through
# both gives 3.5 GB/s and 11.5 ms of fixed cost (60 messages, one per layer and K/V).
LINK_GBS, LINK_LATENCY_MS = 3.5, 11.5
POLICIES = ("distserve", "ecoserve", "vllm")
# `--engine sim` moves a real but tiny KV (engine/sim.py: 2 layers x K, V x 1 head x 8 float32 =
# 128 bytes a token, 4 messages): the fixed cost alone, about a millisecond.
SIM_ENGINE_KV_BYTES, SIM_ENGINE_LINK_LATENCY_MS = 128, 1.0


@dataclass(frozen=True)
class Settings:
    """What both sides are given."""

    model: str
    engine: str  # "model" or "sim" (serve --engine)
    profile: str  # the profile file
    dtype: str
    policy: str
    options: dict[str, Any]  # the policy's options, on both sides
    workload: str
    num_requests: int
    rate: float
    max_prompt_len: int
    max_output_len: int
    prefill: int
    decode: int
    mixed: int  # colocated workers (vllm; ecoserve and distserve may run them too)
    block_size: int
    num_blocks: int
    token_budget: int
    threads: int
    kv_bytes_per_token: int  # what one KV transfer moves per token
    link_bytes_per_s: float
    link_latency_s: float
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    tolerance: float
    seed: int
    calibrate: int  # requests of the calibration replay (0: none)
    server_args: list[str] = field(default_factory=list)


def _profile_path(args: argparse.Namespace) -> str:
    if args.fit:
        return _fit_profile(args)
    if args.profile:
        return str(args.profile)
    if args.model not in BUNDLED:
        raise ValueError(f"no bundled profile for {args.model!r} (bundled: {', '.join(BUNDLED)}); give --profile "
                         "FILE.json or --fit")
    return str(resources.files("ecoserve.data").joinpath("profiles", BUNDLED[args.model]))


def _profile_ref(args: argparse.Namespace, path: str) -> str:
    """How the cluster and the JSON name the profile: a bundled one by its name (which
    `load_profile` and `serve --latency-profile` take), so no install path is recorded."""
    if not args.fit and not args.profile:
        return BUNDLED[args.model].removesuffix(".json")
    return path


def _fit_profile(args: argparse.Namespace) -> str:
    """`ecoserve profile` in this process, with the pool and threads the cluster will get."""
    from ecoserve.bench import profile

    out = args.fit_out or (str(Path(args.out).with_suffix("")) + ".profile.json" if args.out else "out/sim_fidelity.profile.json")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    profile.add_arguments(parser)
    argv = ["--model", args.model, "--out", out, "--threads", str(args.threads_per_worker or 1)]
    argv += ["--quick"] if args.quick else []
    argv += ["--max-len", str(args.max_prompt_len)] if args.max_prompt_len and not args.quick else []
    argv += ["--num-blocks", str(args.num_blocks)] if args.num_blocks else []
    fit_args = parser.parse_args(argv)
    fit_args.command = "profile"
    profile.run_profile(fit_args)
    return out


def settings_from(args: argparse.Namespace) -> Settings:
    from ecoserve.coordinator.policies import make_policy
    from ecoserve.coordinator.policy import check_layout

    for name in ("num_requests", "max_output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    counts = {"prefill": args.prefill, "decode": args.decode, "mixed": args.mixed}
    if min(counts.values()) < 0:
        raise ValueError(f"--prefill, --decode and --mixed must be >= 0, got {args.prefill}, {args.decode}, {args.mixed}")
    if args.calibrate < 0 or (args.calibrate and args.engine == "model" and (args.prefill, args.decode, args.mixed) != (1, 1, 0)):
        raise ValueError(f"--calibrate takes 0 or a number of requests, with --prefill 1 --decode 1 (each worker's "
                         f"steps are rebuilt from token times); got {args.calibrate} with {_layout(counts)}")
    if not args.rate > 0 or args.rate == float("inf"):
        raise ValueError(f"--rate must be a finite number of requests/s > 0, got {args.rate}")
    if not (args.link_gbs > 0 and args.link_latency_ms >= 0 and 0 < args.tolerance < 1):
        raise ValueError("need --link-gbs > 0, --link-latency-ms >= 0 and 0 < --tolerance < 1")
    path = _profile_path(args)
    from ecoserve.latency.profile import load_profile

    prof = load_profile(path)
    doc = json.loads(Path(path).read_text())
    fitted_on = doc.get("model")
    if fitted_on and fitted_on != args.model:
        raise ValueError(f"profile {path} was fitted on {fitted_on!r}, not {args.model!r}: give --model {fitted_on}, "
                         "another --profile, or --fit")
    if not prof.kv_bytes_per_token:
        raise ValueError(f"profile {path} lacks kv_bytes_per_token; fit one with `ecoserve profile` (or --fit)")
    measured = dict(doc.get("settings", {}))
    budget = args.max_num_batched_tokens or int(doc.get("token_budget", 512))
    num_blocks = args.num_blocks or int(doc.get("num_blocks") or (prof.max_num_tokens or 0) // doc.get("block_size", 16))
    if num_blocks < 1:
        raise ValueError(f"profile {path} gives no KV pool size; give --num-blocks")
    options: dict[str, Any] = {}
    server_args = ["--policy", args.policy]
    sim_engine = args.engine == "sim"
    if sim_engine:
        server_args += ["--engine", "sim", "--sim-profile", path]
    if args.policy == "ecoserve":
        costs = {"decode": list(prof.decode_small), "prefill": list(prof.prefill),
                 "kv_bytes_per_token": prof.kv_bytes_per_token, "swap_bytes_per_s": 8e9}
        options = {"predictor": args.predictor, "costs": costs}
        server_args += ["--predictor", args.predictor, "--policy-option", "costs=" + json.dumps(costs)]
        # Its mixed workers budget each step's prompt tokens by the profile (the slo schedule), as
        # the simulated ones do with the same file.
        server_args += ["--latency-profile", _profile_ref(args, path)]
    check_layout(make_policy(args.policy, **options), counts)  # names the layouts the policy accepts
    return Settings(
        model=args.model, engine=args.engine, profile=_profile_ref(args, path), dtype=str(doc.get("dtype", "float32")), policy=args.policy, options=options,
        workload=args.workload, num_requests=args.num_requests, rate=args.rate,
        max_prompt_len=args.max_prompt_len or budget, max_output_len=args.max_output_len,
        prefill=args.prefill, decode=args.decode, mixed=args.mixed, block_size=int(doc.get("block_size", 16)), num_blocks=num_blocks,
        token_budget=budget, threads=args.threads_per_worker or int(measured.get("threads") or 1),
        kv_bytes_per_token=SIM_ENGINE_KV_BYTES if sim_engine else prof.kv_bytes_per_token,
        link_bytes_per_s=args.link_gbs * 1e9,
        link_latency_s=(SIM_ENGINE_LINK_LATENCY_MS if sim_engine else args.link_latency_ms) / 1e3,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, tolerance=args.tolerance, seed=args.seed,
        calibrate=args.calibrate if args.engine == "model" else 0,
        server_args=server_args,
    )


def _layout(counts: dict[str, int]) -> str:
    """`1P+1D`, `2 mixed`: a layout as tables print it."""
    if counts.get("mixed"):
        return (f"{counts['prefill']}P+" if counts.get("prefill") else "") + f"{counts['mixed']} mixed"
    return f"{counts.get('prefill', 0)}P+{counts.get('decode', 0)}D"


def layout(s: Settings) -> str:
    return _layout({"prefill": s.prefill, "decode": s.decode, "mixed": s.mixed})


def build_requests(s: Settings, offset: int = 0, count: int | None = None, seed: int | None = None,
                   ) -> list[WorkloadRequest]:
    """`count` (default `num_requests`) requests of the workload with prompts <= max_prompt_len,
    from the `offset`-th such one on, outputs clipped, Poisson arrivals at `rate` (`seed`)."""
    from ecoserve.data.synthetic import with_arrivals
    from ecoserve.sim.workloads import make_workload

    count = s.num_requests if count is None else count
    pool = make_workload(s.workload, max(1000, 20 * (offset + count)), 1.0, s.seed)  # lengths; arrivals redrawn
    kept = [dataclasses.replace(r, output_len=min(r.output_len, s.max_output_len))
            for r in pool if r.prompt_len <= s.max_prompt_len][offset: offset + count]
    if len(kept) < count:
        raise ValueError(f"only {len(kept)} {s.workload} requests have prompts <= {s.max_prompt_len} tokens "
                         f"after the first {offset}; ask for fewer (--num-requests, --calibrate) or raise --max-prompt-len")
    return with_arrivals(kept, s.rate, seed=s.seed if seed is None else seed)


def calibration_requests(s: Settings) -> list[WorkloadRequest]:
    """The requests after the measured ones in the trace, on other arrival times."""
    return build_requests(s, offset=s.num_requests, count=s.calibrate, seed=s.seed + 1) if s.calibrate else []


# --- the two sides ------------------------------------------------------------------------------


@dataclass
class RealRun:
    """One timed replay on the real cluster."""

    result: Any  # serve_metrics.BenchResult
    wall_s: float
    cpu: dict[str, CPUTime]  # process -> its CPU time over the replay
    cpu_shares: list[float]  # what a busy thread got, every probe period of the replay
    load_before: list[float]
    load_after: list[float]
    calibration: RealRun | None = None  # the calibration replay before it, if any

    @property
    def cpu_share(self) -> float:
        return sum(self.cpu_shares) / len(self.cpu_shares) if self.cpu_shares else 1.0


def run_real(s: Settings, requests: list[WorkloadRequest], progress: bool) -> RealRun:
    """Start the cluster, warm it up, replay the calibration requests (if any), then `requests`."""
    runs = run_real_many(s, [calibration_requests(s), requests] if s.calibrate else [requests], progress)
    run = runs[-1]
    run.calibration = runs[0] if s.calibrate else None
    return run


def run_real_many(s: Settings, replays: list[list[WorkloadRequest]], progress: bool) -> list[RealRun]:
    """Start the cluster, warm it up, then time each list of `replays` in turn, one after the
    other finished (each on its own clock: its first arrival at 0)."""
    from ecoserve.local_cluster import local_cluster

    extra = [*s.server_args, "--num-blocks", str(s.num_blocks), "--block-size", str(s.block_size),
             "--max-num-batched-tokens", str(s.token_budget), "--threads-per-worker", str(s.threads)]
    with local_cluster(s.model, s.prefill, s.decode, s.mixed, *extra, dtype=s.dtype, device="cpu") as addr:
        return asyncio.run(_replay(addr, s, replays, progress))


async def _replay(addr: str, s: Settings, replays: list[list[WorkloadRequest]], progress: bool) -> list[RealRun]:
    from ecoserve.local_cluster import child_pids
    from ecoserve.bench.serve.run import connect, run_benchmark

    client = await connect(addr)
    stats = await client.stats(timeout=10.0)
    await client.close()
    roles = ["prefill"] * s.prefill + ["decode"] * s.decode + ["mixed"] * s.mixed  # rank order
    pids = {f"{role} rank {r}": int(stats[f"rank{r}.pid"]) for r, role in enumerate(roles) if f"rank{r}.pid" in stats}
    serve = [pid for pid in child_pids(os.getpid()) if b" serve " in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")]
    pids |= {"coordinator": pid for pid in serve[:1]}
    # Untimed: the first call of every path (allocator, thread pools), a short and a long prompt.
    await run_benchmark(addr, [WorkloadRequest(0.0, 16, 4), WorkloadRequest(0.0, s.max_prompt_len, 4)], progress=False)
    return [await _timed(addr, s, requests, pids, progress) for requests in replays]


async def _timed(addr: str, s: Settings, requests: list[WorkloadRequest], pids: dict[str, int], progress: bool) -> RealRun:
    from ecoserve.bench.serve.run import run_benchmark
    from ecoserve.client.types import SLO

    before = {name: cpu_time(pid) for name, pid in pids.items()}
    load_before, own, t0 = load_average(), time.process_time(), time.perf_counter()
    with CPUProbe() as probe:
        result = await run_benchmark(addr, requests, SLO(s.slo_ttft_ms, s.slo_tpot_ms), seed=s.seed, progress=progress)
    wall, own = time.perf_counter() - t0, time.process_time() - own
    cpu = {}
    for name, pid in pids.items():
        now, then = cpu_time(pid), before[name]
        if now is not None and then is not None:
            cpu[name] = now - then
    cpu["client (this process)"] = CPUTime(own, math.nan, own, math.nan)
    return RealRun(result, wall, cpu, probe.shares, load_before, load_average())


def run_sim(s: Settings, requests: list[WorkloadRequest], scale: dict[str, float] | None = None) -> tuple[Any, Any]:
    """(SimResult, Simulator) of `requests`; `scale[role]` multiplies that role's step times."""
    from ecoserve.coordinator.policies import make_policy
    from ecoserve.latency.profile import load_profile
    from ecoserve.sim.simulator import HardwareConfig, InstanceSpec, Simulator

    base = load_profile(s.profile)

    def profile(role: str) -> Any:
        k = (scale or {}).get(role, 1.0)
        if k == 1.0:
            return base
        return dataclasses.replace(base, name=f"{base.name} x{k:.2f}", prefill=_times(base.prefill, k),
                                   decode_small=_times(base.decode_small, k), decode_large=_times(base.decode_large, k))

    hw = HardwareConfig(
        block_size=s.block_size, prefill_token_budget=s.token_budget, mixed_token_budget=s.token_budget,
        link_bytes_per_s=s.link_bytes_per_s, link_latency_s=s.link_latency_s,
        host_blocks_factor=0.0,  # the server runs with no host swap space (--num-host-blocks 0)
        kv_bytes_per_token=s.kv_bytes_per_token,
        messages_between_steps=True,  # as the live single-threaded worker loop reads them
        chunked_prefill=True,  # as our engine's FCFS batcher fills its token budget
    )
    specs = [InstanceSpec("prefill", profile("prefill"), 1, s.num_blocks)] * s.prefill
    specs += [InstanceSpec("decode", profile("decode"), 1, s.num_blocks)] * s.decode
    specs += [InstanceSpec("mixed", profile("mixed"), 1, s.num_blocks)] * s.mixed  # rank order, as serve numbers them
    # The live client (bench/serve) sends max_tokens = the trace length with ignore_eos: the same here.
    sim = Simulator(make_policy(s.policy, **s.options), specs, hw, max_tokens="trace")
    return sim.run(requests, s.slo_ttft_ms, s.slo_tpot_ms), sim


def _times(coeffs: tuple[float, float, float], k: float) -> tuple[float, float, float]:
    return (coeffs[0] * k, coeffs[1] * k, coeffs[2] * k)

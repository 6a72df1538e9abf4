"""`ecoserve bench serve`: open-loop load on a running server, from another process.

    ecoserve bench serve --addr tcp://127.0.0.1:5555 --workload azure-conv --num-requests 50 \\
        --replay-timestamps --time-scale 2 --slo-ttft-ms 5000 --slo-tpot-ms 500 --out r.json --plot r.png
    ecoserve bench serve --backend openai --base-url http://127.0.0.1:8000/v1 --workload synthetic ...

Each request is sent at its arrival time whatever the earlier ones are doing, streams its
tokens (so ITL is measured here), generates exactly its workload's output length (greedy,
`ignore_eos`) and carries the SLOs. The server's stats are sampled throughout for the KV cache
timeline. Library use (e.g. `ecoserve demo`):

    result = await run_benchmark(addr, requests, SLO(ttft_ms=5000, tpot_ms=500))
    print_report(result)

Metric definitions: metrics.py. Workloads and clipping: workload.py. Any OpenAI-compatible
server instead (`--backend openai`): openai_backend.py.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from tqdm import tqdm

from ecoserve import envs
from ecoserve.client.aio import AsyncClient
from ecoserve.bench.serve.openai_backend import OpenAITarget, fetch_openai_info, run_openai_benchmark
from ecoserve.bench.serve.metrics import BenchResult, KVSample, RequestResult, kv_sample
from ecoserve.bench.serve.report import plot_cdfs, print_report, write_result
from ecoserve.bench.serve.workload import (
    TEXT_WORKLOADS, WORKLOADS, ArrivalSpec, Workload, WorkloadSpec, build_workload, prompts_for,
)
from ecoserve.client.types import SLO, RequestError, ServerInfo, check_timeout
from ecoserve.data.workload import WorkloadRequest, arrival_span_s
from ecoserve.params import SamplingParams

__all__ = ["fetch_server_info", "print_report", "run_benchmark", "run_serve_benchmark"]

STATS_INTERVAL_S = 0.5
STATS_TIMEOUT_S = 10.0


async def connect(addr: str, timeout: float = 10.0, auth_keys: str | None = None) -> AsyncClient:
    """A client of a server that is up, or ValueError naming why not. `auth_keys`: a key folder
    for a server started with --auth curve."""
    try:
        client = await AsyncClient.connect(addr, timeout=timeout, client_name="ecoserve-bench-serve", auth_keys=auth_keys)
    except TimeoutError:
        hint = "" if auth_keys else " (a server started with --auth curve needs --auth-keys DIR)"
        raise ValueError(f"could not reach the EcoServe server at {addr} within {timeout:g} s{hint}") from None
    except RequestError as exc:
        raise ValueError(f"the server at {addr} refused the handshake: {exc}") from None
    if client.server_info is None or client.server_info.vocab_size == 0:
        await client.close()
        raise ValueError(f"the EcoServe server at {addr} is still starting; retry once it prints 'EcoServe ready'")
    return client


async def fetch_server_info(addr: str, timeout: float = 10.0, auth_keys: str | None = None) -> ServerInfo:
    """The served model and its request limits."""
    client = await connect(addr, timeout, auth_keys)
    await client.close()
    assert client.server_info is not None
    return client.server_info


async def run_benchmark(
    addr: str,
    requests: Sequence[WorkloadRequest] | Workload,
    slo: SLO = SLO(),
    *,
    seed: int = 0,
    connect_timeout: float = 10.0,
    request_timeout: float = 600.0,
    stats_interval_s: float = STATS_INTERVAL_S,
    progress: bool = True,
    auth_keys: str | None = None,
) -> BenchResult:
    """Send `requests` open-loop at their `arrival_s` (relative to the earliest) and measure them.

    Requests without text get seeded random token-id prompts (`seed`). A request with no
    terminal event within `request_timeout` seconds is aborted and reported as lost.
    """
    check_timeout("request_timeout", request_timeout)
    workload = requests if isinstance(requests, Workload) else Workload(list(requests), 0, 0, 0)
    if not workload.requests:
        raise ValueError("no requests to send: every request was dropped by the server's limits")
    client = await connect(addr, connect_timeout, auth_keys)
    try:
        return await _drive(client, workload, slo, seed, request_timeout, stats_interval_s, progress)
    finally:
        await client.close()


async def _drive(
    client: AsyncClient, workload: Workload, slo: SLO, seed: int, timeout: float, interval: float, progress: bool,
) -> BenchResult:
    assert client.server_info is not None
    reqs = workload.requests
    prompts = prompts_for(reqs, client.server_info.vocab_size, seed)
    before = await client.stats(timeout=STATS_TIMEOUT_S)
    samples: list[KVSample] = []
    sampler: list[asyncio.Task[None]] = []

    def started(start: float) -> None:
        sampler.append(asyncio.create_task(_sample_kv(client, start, interval, samples)))

    def send(i: int, arrival: float, start: float, bar: tqdm[Any]) -> Awaitable[RequestResult]:
        return _one(client, i, reqs[i], arrival, prompts[i], slo, start, timeout, bar)

    try:
        results = await send_open_loop(reqs, send, progress, started)
    finally:
        for task in sampler:
            task.cancel()
        await asyncio.gather(*sampler, return_exceptions=True)
    try:
        after = await client.stats(timeout=STATS_TIMEOUT_S)
    except (TimeoutError, ConnectionError, RequestError):
        after = {}  # the server went away: its counters are unknown, the requests say what happened
    return BenchResult(
        sorted(results, key=lambda r: r.index), max(r.end_s for r in results), slo, client.server_info, samples,
        before, after, workload.clipped_prompts, workload.clipped_outputs, workload.dropped,
    )


Send = Callable[[int, float, float, "tqdm[Any]"], Awaitable[RequestResult]]


async def send_open_loop(
    reqs: Sequence[WorkloadRequest], send: Send, progress: bool, started: Callable[[float], None] | None = None,
) -> list[RequestResult]:
    """Start `send(index, arrival_s, start, bar)` for every request at its arrival (relative to
    the earliest, on the loop's clock from `start`), whatever the earlier ones are doing."""
    loop = asyncio.get_running_loop()
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    base = reqs[order[0]].arrival_s
    with tqdm(total=len(reqs), unit="req", desc="requests done", disable=not progress, dynamic_ncols=True) as bar:
        start = loop.time()
        if started is not None:
            started(start)
        tasks: list[asyncio.Task[RequestResult]] = []
        for i in order:
            delay = start + reqs[i].arrival_s - base - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(i, reqs[i].arrival_s - base, start, bar)))
        return list(await asyncio.gather(*tasks))


async def _one(
    client: AsyncClient, index: int, req: WorkloadRequest, arrival_s: float, prompt: str | list[int], slo: SLO,
    start: float, timeout: float, bar: tqdm[Any],
) -> RequestResult:
    loop = asyncio.get_running_loop()
    lag_ms = (loop.time() - start - arrival_s) * 1e3
    params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
    times: list[float] = []
    fields: dict[str, Any] = {}
    status = "ok"
    stream = client.stream(prompt, params, slo=slo, timeout=timeout)
    try:
        async for delta in stream:
            _add_tokens(times, loop.time() - start, len(delta.token_ids))
        done = stream.completion
        assert done is not None
        fields = dict(
            finish_reason=done.finish_reason, server_ttft_ms=done.ttft_ms, server_tpot_ms=done.tpot_ms,
            server_e2e_ms=done.e2e_ms, server_queue_ms=done.queue_ms, server_prefill_ms=done.prefill_ms,
            server_transfer_ms=done.transfer_ms,
        )
        prompt_len = done.num_prompt_tokens
    except TimeoutError:
        status, prompt_len = "lost", req.prompt_len
        fields["error"] = f"no terminal event within {timeout:g} s; aborted"
    except (RequestError, ConnectionError) as exc:
        status, prompt_len = "failed", req.prompt_len
        fields["error"] = str(exc)
    finally:
        bar.update(1)
    return RequestResult(
        index, arrival_s, lag_ms, prompt_len, req.output_len, status, loop.time() - start, times, **fields,
    )


def _add_tokens(times: list[float], now: float, k: int) -> None:
    """Record `k` tokens received at `now`, spread evenly over the wait since the last token
    (the tokens of a first delta all arrived at once)."""
    if not times:
        times.extend([now] * k)
        return
    last = times[-1]
    times.extend(last + (now - last) * (j + 1) / k for j in range(k))


async def _sample_kv(client: AsyncClient, start: float, interval: float, out: list[KVSample]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            stats = await client.stats(timeout=STATS_TIMEOUT_S)
        except TimeoutError:
            continue
        except (ConnectionError, RequestError):
            return  # the requests will report what went wrong
        out.append(kv_sample(loop.time() - start, stats))
        await asyncio.sleep(interval)


# --- the command ---------------------------------------------------------------------------


BACKENDS = ("zmq", "openai")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", default="zmq",
        help="zmq (default): an EcoServe server's client address (--addr); openai: any OpenAI-compatible server "
        "(--base-url), through streamed /v1/completions",
    )
    parser.add_argument("--addr", default=None, help="--backend zmq: the server's client address, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--base-url", default=None, help="--backend openai: the API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="--backend openai: the model to ask for (default: the only one served)")
    parser.add_argument(
        "--api-key", default=None,
        help="--backend openai: sent as 'Authorization: Bearer KEY' (default: the ECOSERVE_API_KEY environment variable)",
    )
    parser.add_argument(
        "--strict-openai", action="store_true",
        help="--backend openai: send only fields OpenAI's API defines (no ignore_eos, no SLO fields), for servers "
        "that refuse others; outputs may then end early",
    )
    parser.add_argument("--workload", default="synthetic", help=f"one of {', '.join(WORKLOADS)}")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1.0, help="mean requests per second (inf: all at once)")
    parser.add_argument("--arrival", default="poisson", help="poisson or gamma")
    parser.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma inter-arrival gaps")
    parser.add_argument("--replay-timestamps", action="store_true", help="use the Azure trace's own arrival times")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply replayed gaps by this (0.5: twice as fast)"
    )
    parser.add_argument("--trace-file", type=Path, default=None, help="an Azure-format CSV, not the bundled trace")
    parser.add_argument(
        "--max-prompt-len", type=int, default=None, help="clip prompts further (default: the server's limit)"
    )
    parser.add_argument(
        "--max-output-len", type=int, default=None, help="clip outputs further (default: the context only)"
    )
    parser.add_argument("--prompt-mean", type=float, default=256.0, help="synthetic: mean prompt tokens")
    parser.add_argument("--output-mean", type=float, default=128.0, help="synthetic: mean output tokens")
    parser.add_argument(
        "--tokenizer", default=None, help="sharegpt/humaneval: the model whose tokenizer counts (default: the server's)"
    )
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="time-to-first-token target (ms)")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="time-per-output-token target (ms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the server")
    parser.add_argument(
        "--auth-keys", default=None, metavar="DIR",
        help="a server started with --auth curve: the key folder (server.pub, client.pub, client.key)",
    )
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request counts as lost")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write latency CDFs (TTFT, TPOT, E2E) to this .png")


def run_serve_benchmark(args: argparse.Namespace) -> int:
    """Exit code 0 when every request finished, 1 when some failed or were lost."""
    spec, slo = _check_args(args)
    if args.backend == "openai":
        return asyncio.run(_main_openai(args, spec, slo))
    return asyncio.run(_main(args, spec, slo))


def _check_backend(args: argparse.Namespace) -> None:
    """The options of the chosen backend, and none of the other's."""
    if args.backend not in BACKENDS:
        raise ValueError(f"unknown --backend {args.backend!r}; allowed: {', '.join(BACKENDS)}")
    theirs = {"zmq": ("--base-url", "--model", "--api-key", "--strict-openai"), "openai": ("--addr", "--auth-keys")}
    for option in theirs[args.backend]:
        if getattr(args, option.lstrip("-").replace("-", "_")) not in (None, False):
            other = next(b for b in BACKENDS if b != args.backend)
            raise ValueError(f"{option} belongs to --backend {other}, not --backend {args.backend}")
    needed = "--addr" if args.backend == "zmq" else "--base-url"
    if getattr(args, needed.lstrip("-").replace("-", "_")) is None:
        example = "tcp://127.0.0.1:5555" if args.backend == "zmq" else "http://127.0.0.1:8000/v1"
        raise ValueError(f"--backend {args.backend} needs {needed} (e.g. {needed} {example})")


def _check_args(args: argparse.Namespace) -> tuple[WorkloadSpec, SLO]:
    """Everything that can be wrong before the server is contacted, as ValueError."""
    _check_backend(args)
    arrivals = ArrivalSpec(args.rate, args.arrival, args.cv, args.replay_timestamps, args.time_scale)
    spec = WorkloadSpec(
        args.workload, args.num_requests, arrivals, args.seed, args.trace_file, args.max_prompt_len,
        args.max_output_len, args.prompt_mean, args.output_mean,
    )
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    check_timeout("--connect-timeout", args.connect_timeout)
    check_timeout("--request-timeout", args.request_timeout)
    if args.plot is not None:
        if Path(args.plot).suffix.lower() != ".png":
            raise ValueError(f"--plot writes a PNG; give a file name ending in .png, got {args.plot!r}")
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib; install it with `pip install matplotlib`")
    return spec, slo


async def _main(args: argparse.Namespace, spec: WorkloadSpec, slo: SLO) -> int:
    info = await fetch_server_info(args.addr, args.connect_timeout, args.auth_keys)
    tokenizer = _load_tokenizer(args.tokenizer or info.model_id) if spec.name in TEXT_WORKLOADS else None
    workload = build_workload(spec, info, tokenizer)
    print(
        f"{len(workload.requests)} {spec.name} requests to {info.model_id} at {args.addr} over "
        f"{arrival_span_s(workload.requests):.1f} s; clipped {workload.clipped_prompts} prompts and "
        f"{workload.clipped_outputs} outputs to the server's limits, dropped {workload.dropped}",
        flush=True,
    )
    result = await run_benchmark(
        args.addr, workload, slo, seed=args.seed, connect_timeout=args.connect_timeout,
        request_timeout=args.request_timeout, progress=not args.no_progress, auth_keys=args.auth_keys,
    )
    return _report(args, spec, result, info)


def _report(args: argparse.Namespace, spec: WorkloadSpec, result: BenchResult, info: ServerInfo) -> int:
    """Table, JSON and plot (as asked); the exit code."""
    title = f"Serving Benchmark Result: {spec.name}, {info.model_id}"
    print_report(result, title)
    if args.out:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
        write_result(args.out, result, settings)
    if args.plot:
        plot_cdfs(result, args.plot)
    return 0 if all(r.status == "ok" for r in result.requests) else 1


async def _main_openai(args: argparse.Namespace, spec: WorkloadSpec, slo: SLO) -> int:
    target = OpenAITarget(args.base_url, args.model, args.api_key or envs.api_key(), args.strict_openai)
    named = await fetch_openai_info(target, args.connect_timeout, 0, _sum_or_none(args.max_prompt_len, args.max_output_len))
    tokenizer = _openai_tokenizer(args.tokenizer or named.model_id)
    info = dataclasses.replace(named, vocab_size=tokenizer.tokenizer.get_vocab_size())
    workload = build_workload(spec, info, tokenizer if spec.name in TEXT_WORKLOADS else None)
    print(
        f"{len(workload.requests)} {spec.name} requests to {info.model_id} at {target.root} over "
        f"{arrival_span_s(workload.requests):.1f} s; clipped {workload.clipped_prompts} prompts and "
        f"{workload.clipped_outputs} outputs to the server's limits, dropped {workload.dropped}",
        flush=True,
    )
    result = await run_openai_benchmark(target, info, workload, slo, seed=args.seed, request_timeout=args.request_timeout,
                                        progress=not args.no_progress)
    return _report(args, spec, result, info)


def _sum_or_none(a: int | None, b: int | None) -> int | None:
    return a + b if a is not None and b is not None else None


def _openai_tokenizer(model: str) -> Any:
    """The tokenizer that counts text prompts and bounds token-id ones, or ValueError naming --tokenizer."""
    try:
        return _load_tokenizer(model)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise ValueError(f"could not load a tokenizer for {model!r} ({str(exc).splitlines()[0] if str(exc) else exc}); "
                         "give --tokenizer NAME|FOLDER (a model EcoServe knows, or a folder with tokenizer.json)") from None


def _load_tokenizer(model: str) -> Any:
    """The server's own tokenizer, so text prompts count here as they count there."""
    from ecoserve.coordinator.frontend import TextCodec
    from ecoserve.model.registry import resolve_model

    return TextCodec(resolve_model(model))

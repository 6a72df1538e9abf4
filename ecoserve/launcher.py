"""Starts a cluster on this machine: the coordinator (in this process) and one process per
worker rank, all wired here with directional names.

    client_to_coordinator   the coordinator's front door (ROUTER), printed when ready
    worker_to_coordinator   the coordinator's control ROUTER; each rank connects a DEALER
    prefill_to_decode       torch.distributed P2P in one world of all worker ranks

Ranks are numbered prefill first, then decode, then mixed. Worker processes get their config
as JSON on the command line (`python -m ecoserve.launcher worker '{...}'`): nothing is pickled.
On SIGINT/SIGTERM the coordinator drains (finishes or fails what is in flight), tells every
worker to stop, and any process still alive after a grace period is killed. Workers ignore
SIGINT and SIGTERM themselves (a signal to the whole group, as Ctrl-C or systemd sends, must not
cut the drain short): they stop on the coordinator's Shutdown, or within 1 s of the launcher's
death at any stage, start-up included (ecoserve/runtime/parent.py).
A worker the coordinator declared lost (its heartbeats stopped) is told to shut down; one still
running `FENCE_GRACE_S` later is killed, so a stalled rank cannot come back half-alive.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ecoserve.envs import cluster_secret, launcher_pid, start_error_file
from ecoserve.config import (
    CacheConfig, ClusterShape, CoordinatorConfig, EngineConfig, ModelConfig, SchedulerConfig, WorkerConfig,
)

if TYPE_CHECKING:
    from ecoserve.coordinator.server import Coordinator
    from ecoserve.openai_api.process import HttpSpec

STARTUP_TIMEOUT_S = 300.0
EXIT_GRACE_S = 10.0
FENCE_GRACE_S = 5.0  # a lost worker's time to obey its Shutdown before it is killed
WORKER_START_FAILED = 3  # a worker's exit status when it could not be built; it printed why in one line
# What a worker's start-up failure says about its input (a model folder, a pool size, memory):
# the one line is the whole story. Anything else is a bug, and its traceback is printed before it.
USER_ERRORS = (ValueError, KeyError, OSError, MemoryError)


@dataclass(frozen=True)
class ClusterSpec:
    """`ecoserve serve`'s workers: the counts its flags gave, held to serve's rules (decode
    workers with prefill workers, prefill workers with decode or mixed ones, at least one
    worker); no tensor parallelism."""

    num_prefill: int
    num_decode: int
    num_mixed: int

    def __post_init__(self) -> None:
        if min(self.num_prefill, self.num_decode, self.num_mixed) < 0:
            raise ValueError("worker counts must be >= 0")
        # A prefill worker sends its KV on to a decode or a mixed worker; a decode worker takes it
        # from a prefill worker.
        if (self.num_decode and not self.num_prefill) or (self.num_prefill and not (self.num_decode or self.num_mixed)):
            raise ValueError(
                f"prefill and decode workers come together, or prefill with mixed workers (got --prefill "
                f"{self.num_prefill} --decode {self.num_decode} --mixed {self.num_mixed}); for colocated serving "
                "use --mixed K alone"
            )
        if self.world_size == 0:
            raise ValueError("no workers: give --prefill P --decode D (both >= 1) and/or --mixed K")

    @property
    def shape(self) -> ClusterShape:
        return ClusterShape(prefill=self.num_prefill, decode=self.num_decode, mixed=self.num_mixed)

    @property
    def world_size(self) -> int:
        return self.shape.num_instances

    def roles(self) -> list[str]:
        """One role per rank: prefill first, then decode, then mixed."""
        return self.shape.roles()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_config_to_json(config: WorkerConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def worker_config_from_json(text: str) -> WorkerConfig:
    raw = json.loads(text)
    eng = raw.pop("engine")
    engine = EngineConfig(
        model=ModelConfig(**eng["model"]), cache=CacheConfig(**eng["cache"]), scheduler=SchedulerConfig(**eng["scheduler"])
    )
    return WorkerConfig(engine=engine, **raw)


def start_worker(config: WorkerConfig, threads: int, error_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Start one worker rank. Call it from the launcher's main thread: the worker's parent-death
    signal fires when the thread that started it exits, not only the process. With `error_file`
    the worker writes its one-line start-up error there instead of printing it."""
    env = dict(os.environ, ECOSERVE_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if error_file is not None:
        env["ECOSERVE_START_ERROR_FILE"] = str(error_file)
    env["ECOSERVE_CLUSTER_SECRET"] = config.secret
    env["ECOSERVE_LAUNCHER_PID"] = str(os.getpid())  # the worker exits when this process does
    config = dataclasses.replace(config, secret="")  # not on the command line: see envs.cluster_secret
    cmd = [sys.executable, "-m", "ecoserve.launcher", "worker", worker_config_to_json(config)]
    return subprocess.Popen(cmd, env=env)


async def run_cluster(
    spec: ClusterSpec, engine: EngineConfig, coord_config: CoordinatorConfig, model_folder: Path,
    threads_per_worker: int | None = None, ready_file: Path | None = None, http: HttpSpec | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    from ecoserve.coordinator.server import Coordinator
    from ecoserve.coordinator.workers import ExpectedRank

    roles = spec.roles()
    if not coord_config.secret:  # a fresh secret per cluster: a stray process cannot register as a worker
        coord_config = dataclasses.replace(coord_config, secret=secrets.token_hex(16))
    coord = Coordinator(coord_config, model_folder, [ExpectedRank(r, role) for r, role in enumerate(roles)])
    coord.bind()
    dist_init = f"tcp://127.0.0.1:{free_port()}"
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // len(roles))
    with tempfile.TemporaryDirectory(prefix="ecoserve-start-") as errors:
        # Workers that fail to start write their line here: the first is printed, not one per rank.
        error_files = [Path(errors) / f"rank-{rank}" for rank in range(len(roles))]
        procs = [
            start_worker(
                WorkerConfig(
                    rank, len(roles), role, coord.control_addr, dist_init, engine, secret=coord_config.secret,
                    max_transfers_in_flight_per_pair=coord_config.max_transfers_in_flight_per_pair,
                ),
                threads,
                error_files[rank],
            )
            for rank, role in enumerate(roles)
        ]
        layout = "ranks: " + ", ".join(f"{r}={role}" for r, role in enumerate(roles))
        return await serve_until_stopped(coord, procs, coord_config, layout, ready_file, error_files=error_files, http=http)


async def serve_until_stopped(
    coord: Coordinator, procs: list[subprocess.Popen[bytes]], coord_config: CoordinatorConfig, layout: str,
    ready_file: Path | None, linger_s: float = 0.2, error_files: list[Path] | None = None,
    http: HttpSpec | None = None, world_size: int | None = None,
) -> int:
    """Run the coordinator until SIGINT/SIGTERM with this machine's worker processes `procs`
    (ranks 0 .. len(procs)-1): wait for every rank to register, announce, watch, drain, stop.
    With `http`, the HTTP front door's process (OpenAI API and/or /metrics) starts once the
    ranks are in and stops first; its /health counts `world_size` ranks (default: `procs`)."""
    from ecoserve.openai_api.process import HttpStartFailed, start_http, stop_http

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serve_task = asyncio.create_task(coord.serve())
    serve_task.add_done_callback(lambda _: stop.set())  # a coordinator that crashed stops the cluster
    code = 0
    http_proc: subprocess.Popen[bytes] | None = None
    try:
        code = await _startup(coord, procs, stop, error_files)
        if code == 0 and http is not None:
            try:
                http_proc, urls = await start_http(http, coord.client_addr, world_size or len(procs))
                layout += f"; {urls.describe()}"
            except HttpStartFailed as failed:
                print(f"error: {failed}", file=sys.stderr, flush=True)
                code = failed.code
        if code == 0:
            print(f"EcoServe ready at {coord.client_addr}  (policy {coord_config.policy}; {layout})", flush=True)
            if ready_file is not None:
                ready_file.write_text(coord.client_addr)
            await _watch(coord, procs, stop)
            if http_proc is not None:
                await asyncio.to_thread(stop_http, http_proc)  # no new HTTP requests during the drain
            if not serve_task.done():
                await coord.drain(coord_config.drain_timeout_s)
        exc = serve_task.exception() if serve_task.done() and not serve_task.cancelled() else None
        if exc is not None:
            traceback.print_exception(exc, file=sys.stderr)
            print(f"error: the coordinator stopped: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            code = 1
    finally:
        if http_proc is not None and http_proc.poll() is None:
            http_proc.kill()
            http_proc.wait()
        coord.stop()
        await asyncio.sleep(linger_s)  # let Shutdown frames leave
        serve_task.cancel()
        await asyncio.gather(serve_task, return_exceptions=True)
        _reap(procs)
        coord.close()
    return code


async def _startup(
    coord: Coordinator, procs: list[subprocess.Popen[bytes]], stop: asyncio.Event, error_files: list[Path] | None = None,
) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not coord.ready:
        for rank, proc in enumerate(procs):
            if proc.poll() is not None:
                for other in procs:  # no cluster forms without this rank: nothing to drain or wait for
                    if other.poll() is None:
                        other.kill()
                if proc.returncode == WORKER_START_FAILED:  # its one line: printed, or in its error file
                    if error_files is not None and error_files[rank].exists():
                        print(error_files[rank].read_text().strip(), file=sys.stderr, flush=True)
                    return 2
                print(f"error: worker rank {rank} exited with code {proc.returncode} during start-up "
                      "(its error is printed above)", file=sys.stderr, flush=True)
                return 1
        if stop.is_set():
            return 130
        if time.monotonic() > deadline:
            print(f"error: workers did not all register within {STARTUP_TIMEOUT_S:.0f} s", file=sys.stderr, flush=True)
            return 1
        await asyncio.sleep(0.1)
    return 0


async def _watch(coord: Coordinator, procs: list[subprocess.Popen[bytes]], stop: asyncio.Event) -> None:
    reported: set[int] = set()
    fenced: dict[int, float] = {}  # rank declared lost while its process runs -> when we noticed
    while not stop.is_set():
        for rank, proc in enumerate(procs):
            if rank not in reported and proc.poll() is not None:
                reported.add(rank)
                coord.worker_lost(rank, f"its process exited with code {proc.returncode}")
            elif rank not in reported and coord.is_lost(rank):
                since = fenced.setdefault(rank, time.monotonic())
                if time.monotonic() - since > FENCE_GRACE_S:
                    print(f"rank {rank} was declared lost and did not stop within {FENCE_GRACE_S:g} s: killing it",
                          file=sys.stderr, flush=True)
                    proc.kill()
                    fenced[rank] = float("inf")
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + EXIT_GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_async(coro: object) -> int:
    """Run on uvloop when it is installed (it is a dependency), else asyncio's own loop."""
    try:
        import uvloop

        return int(uvloop.run(coro))  # type: ignore[arg-type]
    except ImportError:
        return int(asyncio.run(coro))  # type: ignore[arg-type]


def _worker_main(config_json: str) -> int:
    parent = launcher_pid()
    if parent is not None:  # first: a launcher killed while we load must not leave us running
        from ecoserve.runtime.parent import exit_with_launcher

        exit_with_launcher(parent)
    # Ctrl-C (and systemd's stop) signal the whole group; the launcher leads the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = worker_config_from_json(config_json)
    config = dataclasses.replace(config, secret=config.secret or cluster_secret())
    from ecoserve.runtime.rank import WorkerRefused, WorkerStartFailed, serve_worker

    if config.role == "prefill":
        from ecoserve.prefill.worker import PrefillWorker as cls
    else:
        from ecoserve.decode.worker import DecodeWorker as cls  # type: ignore[assignment]
    try:
        serve_worker(cls, config)
    except WorkerRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerStartFailed as exc:  # one line, as `ecoserve serve` refuses anything else
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, USER_ERRORS):  # a bug, not bad input: keep its trace
            traceback.print_exception(cause, file=sys.stderr)
        line = f"ecoserve: error: {exc}"
        path = start_error_file()
        if path is None:
            print(line, file=sys.stderr, flush=True)
        else:
            path.write_text(line + "\n")
        return WORKER_START_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecoserve.launcher")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run one worker rank (started by the launcher)")
    w.add_argument("config_json")
    args = parser.parse_args(argv)
    return _worker_main(args.config_json)


if __name__ == "__main__":
    sys.exit(main())

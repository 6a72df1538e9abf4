"""`ecoserve bench soak`: sustained open-loop load on a local cluster while workers die.

    ecoserve bench soak --engine sim --duration 600 --kill-every 150 --out soak.json

Starts `ecoserve serve` (2 prefill + 3 decode by default), measures its capacity with a short
closed-loop burst (or takes `--rate`), then sends requests at 80% of it as a Poisson process
for `--duration` seconds. A third of the way in, `--burst` more requests (1,000 by default, far
more than the prefill pools hold) arrive at once on top of that load; 0 turns the burst off.
Every `--kill-every` seconds one worker is SIGKILLed, never the last of its role. Checks that every request ends exactly once (a completion or an error reply, with
no duplicate or gap in its deltas), that nothing is left unanswered `--grace` seconds after the
load stops ("lost"), that the block accounting returns to zero once idle ("leaked"), and samples
each process's RSS at the start and the end. Exits 1 when anything was lost or leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecoserve.client.aio import AsyncClient
from ecoserve.local_cluster import local_cluster
from ecoserve.client.types import RequestError
from ecoserve.config import ClusterShape
from ecoserve.params import SamplingParams

LOAD_FRACTION = 0.8
CAPACITY_PROBE_S = 8.0
LEAK_KEYS = ("kv_used_blocks", "reserved_blocks", "requests_releasing")
DEFAULT_BURST = 1000


@dataclass(frozen=True)
class SoakConfig:
    """What to run: the cluster, the load and the faults."""

    duration_s: float
    engine: str = "sim"  # "sim" (latency-model workers) or "model" (the weights)
    model: str = "tiny-llama"
    prefill: int = 2
    decode: int = 3
    kill_every_s: float = 0.0  # 0: no kills
    rate: float | None = None  # requests/s; None: 80% of the measured capacity
    max_prompt: int = 200
    max_tokens: int = 48
    grace_s: float = 30.0
    heartbeat_timeout_s: float = 3.0
    max_retries: int = 6
    sim_time_scale: float = 0.2
    seed: int = 0
    burst: int = 0  # requests sent at once a third of the way in; 0: none (the command's default: DEFAULT_BURST)

    @property
    def burst_at_s(self) -> float:
        """When the burst goes out, from the start of the load."""
        return self.duration_s / 3

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.engine not in ("sim", "model"):
            raise ValueError(f"--engine must be sim or model, got {self.engine!r}")
        if self.prefill < 1 or self.decode < 1:
            raise ValueError(f"a soak needs at least 1 prefill and 1 decode worker, got {self.prefill} + {self.decode}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate must be > 0 requests/s, got {self.rate}")
        if self.burst < 0:
            raise ValueError(f"--burst must be >= 0 requests (0: no burst), got {self.burst}")

    @property
    def shape(self) -> ClusterShape:
        """The cluster the soak starts (`--prefill`, `--decode`; ranks prefill first)."""
        return ClusterShape(prefill=self.prefill, decode=self.decode)

    def serve_args(self) -> list[str]:
        out = ["--threads-per-worker", "1", "--engine", self.engine, "--heartbeat-timeout", str(self.heartbeat_timeout_s),
               "--max-retries", str(self.max_retries), "--num-blocks", "512"]
        return out + (["--sim-time-scale", str(self.sim_time_scale)] if self.engine == "sim" else [])


@dataclass
class Tally:
    """Terminal events seen per request, and the checks on each stream."""

    sent: int = 0
    served: int = 0
    errored: int = 0
    broken: int = 0  # a duplicate or gap in the deltas, or more than one terminal event
    burst_sent: int = 0  # of `sent`, those sent in the burst
    errors: dict[str, int] = field(default_factory=dict)
    open_ids: set[int] = field(default_factory=set)  # sent, no terminal event yet

    def end(self, i: int, error: str | None) -> None:
        if i not in self.open_ids:
            self.broken += 1
            return
        self.open_ids.discard(i)
        if error is None:
            self.served += 1
        else:
            self.errored += 1
            self.errors[error] = self.errors.get(error, 0) + 1


def job(rng: random.Random, vocab: int, cfg: SoakConfig) -> tuple[list[int], SamplingParams]:
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, cfg.max_prompt))]
    return prompt, SamplingParams(max_tokens=rng.randint(4, cfg.max_tokens), temperature=0.0, ignore_eos=True)


async def one(client: AsyncClient, i: int, prompt: list[int], params: SamplingParams, tally: Tally) -> None:
    tally.sent += 1
    tally.open_ids.add(i)
    at, error = 0, None
    try:
        s = client.stream(prompt, params)
        async for delta in s:
            if delta.index != at:
                tally.broken += 1
            at = delta.index + len(delta.token_ids)
        if s.completion is None or len(s.completion.token_ids) != at:
            tally.broken += 1
    except RequestError as exc:
        error = exc.code
    tally.end(i, error)


async def measure_capacity(client: AsyncClient, cfg: SoakConfig, vocab: int) -> float:
    """Requests/s finished by a closed loop of 2 requests per worker for CAPACITY_PROBE_S."""
    rng, done, stop = random.Random(cfg.seed + 1), 0, time.monotonic() + CAPACITY_PROBE_S
    t0 = time.monotonic()

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await client.generate(*job(rng, vocab, cfg))
            done += 1

    await asyncio.gather(*(loop() for _ in range(2 * cfg.shape.num_instances)))
    return done / (time.monotonic() - t0)


def rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except ImportError:
        pass
    except Exception:  # the process is gone
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory_row(pid: int, start: float | None, end: float | None) -> dict[str, Any]:
    """One process's RSS at the start and the end; None where it was gone (killed)."""
    growth = None if start is None or end is None else end - start
    return {"pid": pid, "rss_start_mb": start, "rss_end_mb": end, "growth_mb": growth}


def processes(stats: dict[str, float], cfg: SoakConfig) -> dict[str, int]:
    """Name -> pid of the coordinator and every live worker rank."""
    out = {"coordinator": int(stats["coordinator_pid"])}
    roles = cfg.shape.roles()
    for key, value in stats.items():
        if key.startswith("rank") and key.endswith(".pid"):
            rank = int(key[4:].split(".")[0])
            out[f"rank{rank}-{roles[rank]}"] = int(value)
    return out


async def killer(client: AsyncClient, cfg: SoakConfig, stop_at: float, killed: list[dict[str, Any]]) -> None:
    """At every multiple of kill_every_s before the end: SIGKILL one worker of the role with the
    most alive, while it has more than one. The times are fixed from the start, so how many kills
    are due depends on the settings alone, never on how long a stats call took."""
    start, due = stop_at - cfg.duration_s, 1
    while start + due * cfg.kill_every_s < stop_at:
        await asyncio.sleep(max(0.0, start + due * cfg.kill_every_s - time.monotonic()))
        due += 1
        alive = processes(await client.stats(), cfg)
        roles = {role: [n for n in alive if n.endswith(role)] for role in ("prefill", "decode")}
        role = max(roles, key=lambda r: len(roles[r]))
        if len(roles[role]) < 2:
            return
        name = random.Random(cfg.seed + len(killed)).choice(roles[role])
        os.kill(alive[name], signal.SIGKILL)
        killed.append({"name": name, "pid": alive[name], "t_s": round(time.monotonic() - (stop_at - cfg.duration_s), 1)})


async def settle(client: AsyncClient, timeout: float) -> dict[str, float]:
    """Stats once the block accounting is back to zero, or the last ones after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await client.stats()
        if not any(stats.get(k, 0) for k in LEAK_KEYS) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.5)


async def drive(client: AsyncClient, cfg: SoakConfig, rate: float, tally: Tally, killed: list[dict[str, Any]]) -> None:
    """Poisson arrivals at `rate` for the duration; then wait `grace_s` for the stragglers."""
    assert client.server_info is not None
    vocab, rng = client.server_info.vocab_size, random.Random(cfg.seed)
    t0 = time.monotonic()
    stop_at = t0 + cfg.duration_s
    kills = asyncio.ensure_future(killer(client, cfg, stop_at, killed)) if cfg.kill_every_s > 0 else None
    tasks: list[asyncio.Future[None]] = []
    burst_rng = random.Random(cfg.seed + 2)

    async def burst() -> None:
        await asyncio.sleep(max(0.0, t0 + cfg.burst_at_s - time.monotonic()))
        for _ in range(cfg.burst):  # no await between them: they go out together
            tasks.append(asyncio.ensure_future(one(client, len(tasks), *job(burst_rng, vocab, cfg), tally)))
        tally.burst_sent += cfg.burst

    bursts = asyncio.ensure_future(burst()) if cfg.burst else None
    next_at = t0
    while True:
        next_at += rng.expovariate(rate)
        if next_at >= stop_at:
            break
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        tasks.append(asyncio.ensure_future(one(client, len(tasks), *job(rng, vocab, cfg), tally)))
    if bursts is not None:
        await bursts
    if kills is not None:
        await kills
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=cfg.grace_s)
        for task in pending:  # lost: cancelling aborts the request server-side
            task.cancel()


async def soak(addr: str, cfg: SoakConfig) -> dict[str, Any]:
    async with await AsyncClient.connect(addr, timeout=60) as client:
        assert client.server_info is not None
        rate = cfg.rate or LOAD_FRACTION * await measure_capacity(client, cfg, client.server_info.vocab_size)
        start = await settle(client, cfg.grace_s)
        pids = processes(start, cfg)
        rss_start = {name: rss_mb(pid) for name, pid in pids.items()}
        tally, killed = Tally(), list[dict[str, Any]]()
        t0 = time.monotonic()
        await drive(client, cfg, rate, tally, killed)
        lost = len(tally.open_ids)
        end = await settle(client, cfg.grace_s)
        elapsed = time.monotonic() - t0
        rss_end = {name: rss_mb(pid) for name, pid in pids.items()}
    memory = {name: memory_row(pid, rss_start[name], rss_end[name]) for name, pid in pids.items()}
    leaked = int(sum(end.get(k, 0) for k in LEAK_KEYS))
    summary = {"served": tally.served, "errored": tally.errored, "lost": lost, "leaked_blocks": leaked,
               "broken_streams": tally.broken, "sent": tally.sent, "burst_sent": tally.burst_sent, "rate_rps": rate,
               "elapsed_s": elapsed, "transfers_done": end.get("transfers_done", 0.0) - start.get("transfers_done", 0.0),
               "transfers_failed": end.get("transfers_failed", 0.0) - start.get("transfers_failed", 0.0),
               "workers_killed": len(killed), "workers_lost": end.get("workers_lost", 0.0),
               "retries": end.get("retries", 0.0), "server_ended": ended(end) - ended(start),
               "max_rss_growth_mb": max((m["growth_mb"] for m in memory.values() if m["growth_mb"] is not None), default=None)}
    return {"summary": summary, "errors": tally.errors, "killed": killed, "memory": memory,
            "leak_stats": {k: end.get(k, 0.0) for k in LEAK_KEYS},
            "settings": asdict(cfg), "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}}


def ended(stats: dict[str, float]) -> int:
    """Requests the coordinator has ended so far, each counted once: finished, failed, aborted."""
    return int(sum(stats.get(k, 0.0) for k in ("finished", "failed", "aborted")))


def run_soak(cfg: SoakConfig, log_dir: Path | None = None) -> dict[str, Any]:
    """Start the cluster, soak it, stop it (local_cluster checks a clean exit); the report."""
    shape = cfg.shape
    with local_cluster(cfg.model, shape.prefill, shape.decode, shape.mixed, *cfg.serve_args(), log_dir=log_dir) as addr:
        return asyncio.run(soak(addr, cfg))


def print_report(report: dict[str, Any]) -> None:
    s = report["summary"]
    print(f"{'served':>8} {'errored':>8} {'lost':>6} {'leaked':>7} {'broken':>7} {'killed':>7} {'burst':>6} {'rate/s':>7} "
          f"{'elapsed':>8}")
    print(f"{s['served']:>8} {s['errored']:>8} {s['lost']:>6} {s['leaked_blocks']:>7} {s['broken_streams']:>7} "
          f"{s['workers_killed']:>7} {s['burst_sent']:>6} {s['rate_rps']:>7.2f} {s['elapsed_s']:>7.0f}s")
    print(f"\n{'process':<16} {'pid':>8} {'rss start MB':>13} {'rss end MB':>11} {'growth MB':>10}")
    for name, m in report["memory"].items():
        fmt = lambda v: "killed" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{name:<16} {m['pid']:>8} {fmt(m['rss_start_mb']):>13} {fmt(m['rss_end_mb']):>11} {fmt(m['growth_mb']):>10}")
    if report["errors"]:
        print(f"\nerror replies by code: {report['errors']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, required=True, help="seconds of sustained load")
    p.add_argument("--engine", choices=["sim", "model"], default="sim", help="sim: latency-model workers; model: the weights")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=3)
    p.add_argument("--kill-every", type=float, default=0.0, help="SIGKILL one worker this often (seconds; 0: never)")
    p.add_argument("--rate", type=float, default=None, help="requests/s (default: 80%% of a measured capacity)")
    p.add_argument("--max-tokens", type=int, default=48, help="output lengths are uniform in [4, this]")
    p.add_argument("--max-prompt", type=int, default=200, help="prompt lengths are uniform in [4, this]")
    p.add_argument("--grace", type=float, default=30.0, help="seconds after the load for every request to end")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--sim-time-scale", type=float, default=0.2)
    p.add_argument("--burst", type=int, default=DEFAULT_BURST,
                   help="requests sent at once a third of the way into the load, on top of it (0: no burst)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")


def run_soak_benchmark(args: argparse.Namespace) -> int:
    try:
        cfg = SoakConfig(
            duration_s=args.duration, engine=args.engine, model=args.model, prefill=args.prefill, decode=args.decode,
            kill_every_s=args.kill_every, rate=args.rate, max_prompt=args.max_prompt, max_tokens=args.max_tokens,
            grace_s=args.grace, heartbeat_timeout_s=args.heartbeat_timeout, max_retries=args.max_retries,
            sim_time_scale=args.sim_time_scale, burst=args.burst,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_soak(cfg)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    s = report["summary"]
    ok = s["lost"] == 0 and s["leaked_blocks"] == 0 and s["broken_streams"] == 0 and s["server_ended"] == s["sent"]
    return 0 if ok else 1

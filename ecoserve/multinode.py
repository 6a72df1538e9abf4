"""`ecoserve launch`: one cluster over several machines, started once per node.

    node 0:  ecoserve launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29400 --prefill 1
    node 1:  ecoserve launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29400 --decode 1

Rendezvous uses the TCP store torch already provides (`torch.distributed.TCPStore`), hosted by
node 0 at `--master-addr:--master-port`; no home-made protocol:

1. every node writes `node/<rank>`: the roles it runs (and its host name, for messages);
2. node 0 waits for all of them (`--join-timeout`; a node that does not arrive is named in the
   error), numbers the ranks node by node (within a node: prefill, decode, mixed), checks the
   policy against the roles, starts the coordinator (its worker channel bound on
   `--master-addr`), and writes `plan`: the world size, each node's ranks, the coordinator's
   control address, the `torch.distributed` init address for the workers' own world, and the
   cluster secret;
3. every node starts its worker processes with their global ranks; the workers form one
   `torch.distributed` world (gloo/NCCL over TCP on the interface `--iface` names, set as
   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) and register with the coordinator.

Node 0 serves clients (`--host/--port`, 127.0.0.1 by default; with `--http-port` and/or
`--metrics-port` also the OpenAI API and /metrics, as `serve` does) and drains on SIGTERM; its
Shutdown reaches every worker, and the other nodes exit when their workers have. The secret
travels through the store, so the store's port must be reachable only from the cluster's own
network (as for torch's rendezvous itself).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoserve.config import CoordinatorConfig, EngineConfig, WorkerConfig
from ecoserve.launcher import ClusterSpec, free_port, run_async, start_worker

if TYPE_CHECKING:
    from ecoserve.openai_api.process import HttpSpec

ROLES = ("prefill", "decode", "mixed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nnodes", type=int, required=True, help="machines in the cluster")
    p.add_argument("--node-rank", type=int, required=True, help="this machine's index, 0 .. nnodes-1 (0 hosts the coordinator)")
    p.add_argument("--master-addr", required=True, help="node 0's address on the cluster network")
    p.add_argument("--master-port", type=int, default=29400, help="node 0's rendezvous port (torch TCPStore)")
    p.add_argument("--iface", default=None, help="network interface for gloo/NCCL traffic (e.g. eth0)")
    p.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for every node to arrive")


@dataclasses.dataclass(frozen=True)
class NodeArgs:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    iface: str | None
    join_timeout_s: float
    counts: dict[str, int]

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes - 1}], got {self.node_rank}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port must be in [1, 65535], got {self.master_port}")
        if not self.join_timeout_s > 0:
            raise ValueError(f"--join-timeout must be > 0 seconds, got {self.join_timeout_s}")
        if min(self.counts.values()) < 0:
            raise ValueError(f"worker counts must be >= 0, got {self.counts}")
        if self.iface is not None and not os.path.exists(f"/sys/class/net/{self.iface}"):
            have = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
            raise ValueError(f"network interface {self.iface!r} does not exist on this node; it has {have}")


def plan_ranks(nodes: list[dict[str, int]]) -> tuple[list[str], list[list[int]]]:
    """Global roles and each node's ranks: node by node, prefill then decode then mixed."""
    roles: list[str] = []
    ranks: list[list[int]] = []
    for counts in nodes:
        mine = []
        for role in ROLES:
            for _ in range(counts.get(role, 0)):
                mine.append(len(roles))
                roles.append(role)
        ranks.append(mine)
    return roles, ranks


def run_launch(args: argparse.Namespace, engine: EngineConfig, coord: CoordinatorConfig,
               http: HttpSpec | None = None) -> int:
    """This node's part; `http` (node 0 only): the HTTP front door and/or /metrics to serve."""
    node = NodeArgs(
        args.nnodes, args.node_rank, args.master_addr, args.master_port, args.iface, args.join_timeout,
        {"prefill": args.prefill, "decode": args.decode, "mixed": args.mixed},
    )
    if args.iface:  # inherited by the worker processes started below
        os.environ["GLOO_SOCKET_IFNAME"] = args.iface
        os.environ["NCCL_SOCKET_IFNAME"] = args.iface
    store = _connect(node)
    store.set(f"node/{node.node_rank}", json.dumps({**node.counts, "host": os.uname().nodename}))
    if node.node_rank == 0:
        return run_async(_run_master(node, store, engine, coord, args, http))
    return _run_member(node, store, engine, args.threads_per_worker)


def _connect(node: NodeArgs) -> Any:
    from torch.distributed import TCPStore

    timeout = timedelta(seconds=node.join_timeout_s)
    where = f"{node.master_addr}:{node.master_port}"
    try:
        if node.node_rank == 0:
            return TCPStore(node.master_addr, node.master_port, node.nnodes, True, timeout, wait_for_workers=False)
        return TCPStore(node.master_addr, node.master_port, node.nnodes, False, timeout)
    except (RuntimeError, OSError) as exc:
        role = "host the rendezvous on" if node.node_rank == 0 else "reach node 0's rendezvous at"
        raise ValueError(f"node {node.node_rank}: could not {role} {where} within {node.join_timeout_s:.0f} s "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def _wait_keys(store: Any, keys: list[str], timeout_s: float) -> list[str]:
    """Keys still missing after waiting up to `timeout_s` (empty when all arrived)."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [k for k in keys if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


async def _run_master(
    node: NodeArgs, store: Any, engine: EngineConfig, coord_config: CoordinatorConfig, args: argparse.Namespace,
    http: HttpSpec | None = None,
) -> int:
    from ecoserve.coordinator.policies import make_policy
    from ecoserve.coordinator.policy import check_cluster
    from ecoserve.coordinator.server import Coordinator
    from ecoserve.coordinator.workers import ExpectedRank
    from ecoserve.launcher import serve_until_stopped
    from ecoserve.model.registry import resolve_model

    keys = [f"node/{i}" for i in range(node.nnodes)]
    missing = await asyncio.to_thread(_wait_keys, store, keys, node.join_timeout_s)
    if missing:
        names = ", ".join(k.split("/")[1] for k in missing)
        print(f"error: node(s) {names} of {node.nnodes} did not join the rendezvous at {node.master_addr}:"
              f"{node.master_port} within {node.join_timeout_s:.0f} s; start `ecoserve launch --node-rank N "
              f"--master-addr {node.master_addr} --master-port {node.master_port} ...` there", file=sys.stderr, flush=True)
        return 1
    nodes = [json.loads(store.get(k)) for k in keys]
    roles, ranks = plan_ranks(nodes)
    ClusterSpec(roles.count("prefill"), roles.count("decode"), roles.count("mixed"))  # the same rules as serve
    check_cluster(make_policy(coord_config.policy, **coord_config.policy_options), set(roles))
    folder = resolve_model(engine.model.model)
    coord_config = dataclasses.replace(coord_config, control_host=node.master_addr, secret=secrets.token_hex(16))
    coord = Coordinator(coord_config, folder, [ExpectedRank(r, role) for r, role in enumerate(roles)])
    coord.bind()
    dist_init = f"tcp://{node.master_addr}:{free_port(node.master_addr)}"
    plan = {"roles": roles, "ranks": ranks, "control_addr": coord.control_addr, "dist_init": dist_init,
            "secret": coord_config.secret}
    store.set("plan", json.dumps(plan))
    local = ranks[0]
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, len(local)))
    procs = [_start(rank, roles, plan, engine, coord_config, threads) for rank in local]
    layout = "; ".join(f"node {i}: " + ", ".join(f"{r}={roles[r]}" for r in rs) for i, rs in enumerate(ranks))
    ready = Path(args.ready_file) if args.ready_file else None
    if http is not None:
        http = dataclasses.replace(http, model_folder=str(folder))
    # Node 0's ranks are 0 .. len(local)-1; the linger lets Shutdown reach the other nodes.
    return await serve_until_stopped(coord, procs, coord_config, layout, ready, linger_s=0.5, http=http,
                                     world_size=len(roles))


def _start(
    rank: int, roles: list[str], plan: dict[str, Any], engine: EngineConfig, coord: CoordinatorConfig | None,
    threads: int,
) -> subprocess.Popen[bytes]:
    inflight = coord.max_transfers_in_flight_per_pair if coord else WorkerConfig.max_transfers_in_flight_per_pair
    config = WorkerConfig(
        rank, len(roles), roles[rank], plan["control_addr"], plan["dist_init"], engine, secret=plan["secret"],
        max_transfers_in_flight_per_pair=inflight,
    )
    return start_worker(config, threads)


def _run_member(node: NodeArgs, store: Any, engine: EngineConfig, threads_per_worker: int | None) -> int:
    """Nodes 1..N-1: start this node's ranks once node 0 has planned; exit when they have."""
    missing = _wait_keys(store, ["plan"], node.join_timeout_s)
    if missing:
        print(f"error: node 0 at {node.master_addr}:{node.master_port} published no plan within "
              f"{node.join_timeout_s:.0f} s (are all {node.nnodes} nodes started?)", file=sys.stderr, flush=True)
        return 1
    plan = json.loads(store.get("plan"))
    local = plan["ranks"][node.node_rank]
    if not local:
        print(f"node {node.node_rank}: no workers to run here", flush=True)
        return 0
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // len(local))
    procs = {rank: _start(rank, plan["roles"], plan, engine, None, threads) for rank in local}
    print(f"node {node.node_rank}: started ranks " + ", ".join(f"{r}={plan['roles'][r]}" for r in local), flush=True)
    stopping = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = 0
    while procs:
        for rank, proc in list(procs.items()):
            rc = proc.poll()
            if rc is not None:
                del procs[rank]
                if rc != 0:
                    print(f"node {node.node_rank}: rank {rank} exited with code {rc}", file=sys.stderr, flush=True)
                    code = 1
        if stopping:
            for proc in procs.values():
                proc.kill()  # workers ignore SIGTERM (launcher.py); this is what SIGTERM used to do to them
            from ecoserve.launcher import _reap

            _reap(list(procs.values()))
            return 130
        time.sleep(0.2)
    return code

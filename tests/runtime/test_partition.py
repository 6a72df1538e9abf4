"""A network partition between two hosts (tests/runtime/test_two_hosts.py's namespaces): node 0
runs the coordinator, a prefill and a decode worker, node 1 a second decode worker. Mid-generation
node 1's veth goes down: silent past the heartbeat timeout, node 1's worker is declared lost, each of
its requests ends exactly once (resumed on node 0's decode worker, or failed with an error), and
node 0 keeps serving. Simulated workers (`--engine sim`), so the test is about the runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ecoserve import SamplingParams
from ecoserve.local_cluster import child_pids
from tests.runtime.test_sim_engine import offline_tokens
from tests.runtime.test_two_hosts import _launch, _tail, needs_netns, two_hosts  # noqa: F401

HEARTBEAT_S = 3.0
# A request left waiting on a KV transfer with the lost rank would end only when this deadline
# passes; every request ending before it (from the cut) shows none was left waiting.
TRANSFER_DEADLINE_S = 30.0
PARAMS = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


def prompt(i: int) -> list[int]:
    return [5 + i] * (20 + i)  # as CLIENT sends them
SIM = ("--engine", "sim", "--sim-time-scale", "0.5", "--heartbeat-timeout", str(HEARTBEAT_S), "--max-retries", "4",
       "--transfer-deadline", str(TRANSFER_DEADLINE_S))

# Runs in node 0's namespace: streams 8 requests, says "cut" once node 1's rank decodes some,
# reads a line when the link is down, then waits for every request and checks the survivors.
CLIENT = textwrap.dedent("""
    import asyncio, json, sys, time
    from ecoserve import RequestError, SamplingParams
    from ecoserve.client import AsyncClient

    async def one(client, i, out, started):
        at, s = 0, client.stream([5 + i] * (20 + i), SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
        rec = out[i] = {"ends": 0, "gaps": 0, "error": None, "code": None, "token_ids": []}
        try:
            async for d in s:
                rec["gaps"] += d.index != at
                at = d.index + len(d.token_ids)
                started[i].set()
            rec["token_ids"] = list(s.completion.token_ids)
        except RequestError as exc:
            rec["error"], rec["code"] = str(exc), exc.code
        rec["ends"] += 1
        rec["t"] = time.monotonic()

    async def main(addr, pid):
        async with await AsyncClient.connect(addr, timeout=60) as client:
            out, started = {}, [asyncio.Event() for _ in range(8)]
            tasks = [asyncio.ensure_future(one(client, i, out, started)) for i in range(8)]
            for ev in started:
                await asyncio.wait_for(ev.wait(), 60)
            stats = await client.stats()
            rank = next(int(k[4:].split(".")[0]) for k, v in stats.items() if k.endswith(".pid") and int(v) == pid)
            for _ in range(150):  # until node 1's rank holds some requests' KV
                stats = await client.stats()
                if stats[f"rank{rank}.used_blocks"]:
                    break
                await asyncio.sleep(0.1)
            on_node1 = stats[f"rank{rank}.used_blocks"]
            print("cut", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            t0 = time.monotonic()
            while not (lost := await client.stats())["workers_lost"]:
                await asyncio.sleep(0.1)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            ended = max(r["t"] for r in out.values()) - t0
            after = await client.generate([9] * 30, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), timeout=60)
            for _ in range(100):
                stats = await client.stats()
                if not (stats["kv_used_blocks"] or stats["reserved_blocks"] or stats["requests_releasing"]):
                    break
                await asyncio.sleep(0.2)
        print(json.dumps({"out": out, "on_node1": on_node1, "rank": rank, "lost": lost, "ended": ended,
                          "after": len(after.token_ids), "stats": stats}), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


@needs_netns
def test_a_partitioned_decode_host_is_lost_and_its_requests_end_once(two_hosts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ns_a, ns_b, va, vb, addr_a, _ = two_hosts
    ready = tmp_path / "ready"
    port = 29500 + int(uuid.uuid4().hex[:3], 16) % 400
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in (0, 1)]
    node0 = subprocess.Popen(_launch(ns_a, 0, addr_a, port, "prefill", va, "--decode", "1", *SIM, "--port", "0",
                                     "--ready-file", str(ready)), stdout=logs[0], stderr=subprocess.STDOUT)
    node1 = subprocess.Popen(_launch(ns_b, 1, addr_a, port, "decode", vb, *SIM), stdout=logs[1], stderr=subprocess.STDOUT)
    nodes: list[subprocess.Popen[Any]] = [node0, node1]
    client: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if any(n.poll() is not None for n in nodes) or time.monotonic() > deadline:
                pytest.fail("a node exited or the cluster did not come up:\n" + "\n".join(_tail(lg) for lg in logs))
            time.sleep(0.2)
        (node1_worker,) = child_pids(node1.pid)
        client = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-c", CLIENT, ready.read_text(),
                                   str(node1_worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        assert client.stdout.readline().strip() == "cut", "the client did not start streaming:\n" + _tail(logs[0])
        subprocess.run(["ip", "-n", ns_b, "link", "set", "dev", vb, "down"], check=True)
        client.stdin.write("go\n")
        client.stdin.flush()
        line = client.stdout.readline()
        assert client.wait(90) == 0 and line, "the client failed:\n" + _tail(logs[0])
        result = json.loads(line)
        rank, lost = result["rank"], result["lost"]
        print({k: v for k, v in result.items() if k not in ("stats", "out", "lost")},
              {k: v for k, v in lost.items() if k.startswith("lost.")},
              {k: result["stats"][k] for k in ("retries", "finished", "failed")},
              [(len(r["token_ids"]), r["code"]) for r in result["out"].values()])
        # 1. Node 1's worker held requests when the link went down; the heartbeat monitor declares
        #    it lost (it records each rank it finds silent), on the coordinator's own clock: silent
        #    for longer than the heartbeat timeout when declared, and not yet at the monitor's
        #    check before, so at the first check past it, however loaded the machine (the check
        #    period itself is proven on a fake clock in tests/coordinator/test_control_channel.py).
        assert result["on_node1"] > 0 and lost["workers_lost"] == 1
        assert f"lost.{rank}.silent_s" in lost, f"rank {rank} was not declared lost by the heartbeat monitor: {lost}"
        assert lost[f"lost.{rank}.silent_at_previous_check_s"] <= HEARTBEAT_S < lost[f"lost.{rank}.silent_s"], lost
        # 2. Every request ended exactly once, with no gap or duplicate, soon after the loss:
        #    with the reference tokens (an offline sim run of the same prompts), or with a named
        #    error; and node 1's requests were resumed on node 0 (at least one retry).
        reference = offline_tokens([(prompt(i), PARAMS) for i in range(8)])
        stats = result["stats"]
        for i, rec in result["out"].items():
            assert rec["ends"] == 1 and rec["gaps"] == 0, rec
            if rec["error"] is None:
                assert rec["token_ids"] == reference[int(i)], f"request {i} ended with other tokens than the reference"
            else:
                assert rec["code"] == "failed" and "lost" in rec["error"], rec
        failed = sum(rec["error"] is not None for rec in result["out"].values())
        assert stats["retries"] >= 1, "no request of node 1's was resumed"
        assert stats["finished"] == 8 - failed + 1 and stats["failed"] == failed, stats
        assert result["ended"] < TRANSFER_DEADLINE_S, result["ended"]
        # 3. Node 0 still serves and its accounting returns to zero.
        assert result["after"] == 16 and stats["workers_lost"] == 1 and stats["workers_alive"] == 2
        assert stats["kv_used_blocks"] == 0 and stats["reserved_blocks"] == 0 and stats["requests_releasing"] == 0
        node0.send_signal(signal.SIGTERM)
        assert node0.wait(60) == 0, "node 0 exits cleanly with node 1 cut off:\n" + _tail(logs[0])
    finally:
        for proc in [*nodes, *([client] if client is not None else [])]:
            if proc.poll() is None:
                for pid in child_pids(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()

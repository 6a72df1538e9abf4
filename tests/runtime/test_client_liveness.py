"""The client notices a dead or frozen server within its `heartbeat_timeout`, and only then.

Real clusters (`ecoserve serve --engine sim` in a subprocess). A killed server fails every
pending call, a stream without a timeout included, with `RequestError` code
"server_unreachable"; a frozen one does so once its heartbeats stop for `heartbeat_timeout`; a
server that is merely idle or slow for several timeouts is not declared dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from ecoserve import RequestError, SamplingParams
from ecoserve.auth import generate_keys
from ecoserve.client import AsyncClient, Client
from ecoserve.local_cluster import ClusterError, child_pids

SIM = ("--engine", "sim", "--sim-time-scale", "1.0")  # about 20 ms a token: a 2000-token request stays in flight
LONG = SamplingParams(max_tokens=2000, ignore_eos=True)
DEFAULT_TIMEOUT_S = 10.0  # the clients' default heartbeat_timeout, the bound these tests hold them to
MARGIN_S = 5.0  # scheduling slack on a loaded machine, on top of the stated bound


def assert_unreachable(error: object, addr: str, within_s: float) -> None:
    assert isinstance(error, RequestError), repr(error)
    assert error.code == "server_unreachable", str(error)
    assert f"the ecoserve server at {addr} is unreachable" in error.message
    assert f"answered no heartbeat within {within_s:g}s" in error.message and "nothing was heard from it" in error.message


def kill_server(server_pid: int) -> None:
    """SIGKILL the `ecoserve serve` process and its workers: nothing says goodbye."""
    workers = child_pids(server_pid)
    os.kill(server_pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def killed_cluster(cluster) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A cluster the test SIGKILLs: the fixture's exit then reports exactly that."""
    with pytest.raises(ClusterError, match="exited with -9"):
        with cluster("tiny-llama", 1, 1, 0, *SIM) as addr:
            yield addr


async def until_in_flight(client: AsyncClient, n: int) -> None:
    deadline = time.monotonic() + 30
    while (await client.stats())["requests_in_flight"] < n:
        assert time.monotonic() < deadline, f"{n} requests never reached the server"
        await asyncio.sleep(0.05)


def in_thread(call: Callable[[], object]) -> Future[object]:
    """`call()` in a daemon thread: a call that never returns cannot hang the test's exit."""
    future: Future[object] = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def test_a_killed_server_fails_a_stream_without_timeout_and_a_generate_async(cluster) -> None:  # type: ignore[no-untyped-def]
    async def run(addr: str) -> tuple[float, list[object]]:
        async with await AsyncClient.connect(addr, timeout=30) as client:
            # 1. A stream without a timeout, past its first delta, and a generate in flight.
            server_pid = int((await client.stats())["coordinator_pid"])
            deltas = client.stream([1, 2, 3], LONG).__aiter__()
            await asyncio.wait_for(deltas.__anext__(), 30)
            generate = asyncio.ensure_future(client.generate([4, 5, 6], LONG))
            await until_in_flight(client, 2)

            async def rest_of_stream() -> None:
                async for _ in deltas:
                    pass

            # 2. SIGKILL: both calls fail as unreachable within the bound, not "forever".
            kill_server(server_pid)
            t0 = time.monotonic()
            both = asyncio.gather(rest_of_stream(), generate, return_exceptions=True)
            outcomes = await asyncio.wait_for(both, DEFAULT_TIMEOUT_S + MARGIN_S)
            elapsed = time.monotonic() - t0
            # 3. The client stays failed: a later call says the same.
            with pytest.raises(RequestError) as later:
                await client.stats()
            return elapsed, [*outcomes, later.value]

    with killed_cluster(cluster) as addr:
        elapsed, errors = asyncio.run(run(addr))
    for error in errors:
        assert_unreachable(error, addr, DEFAULT_TIMEOUT_S)
    assert elapsed < DEFAULT_TIMEOUT_S + MARGIN_S


def test_a_killed_server_fails_a_stream_without_timeout_and_a_generate_sync(cluster) -> None:  # type: ignore[no-untyped-def]
    with killed_cluster(cluster) as addr:
        with Client(addr, timeout=30) as client:
            # 1. A stream without a timeout, past its first delta, and a generate in flight.
            server_pid = int(client.stats()["coordinator_pid"])
            deltas = iter(client.stream([1, 2, 3], LONG))
            next(deltas)
            generate = in_thread(lambda: client.generate([4, 5, 6], LONG))
            deadline = time.monotonic() + 30
            while client.stats()["requests_in_flight"] < 2:
                assert time.monotonic() < deadline, "the generate never reached the server"
                time.sleep(0.05)
            # 2. SIGKILL: both calls fail as unreachable within the bound, not "forever".
            kill_server(server_pid)
            t0 = time.monotonic()
            streamed = in_thread(lambda: list(deltas))
            errors = [streamed.exception(DEFAULT_TIMEOUT_S + MARGIN_S), generate.exception(DEFAULT_TIMEOUT_S + MARGIN_S)]
            elapsed = time.monotonic() - t0
            # 3. The client stays failed: a later call says the same.
            with pytest.raises(RequestError) as later:
                client.generate([7], SamplingParams(max_tokens=2))
            errors.append(later.value)
    for error in errors:
        assert_unreachable(error, addr, DEFAULT_TIMEOUT_S)
    assert elapsed < DEFAULT_TIMEOUT_S + MARGIN_S


def test_a_frozen_server_is_declared_unreachable_after_the_heartbeat_timeout(cluster) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP: the connection stays open, only the missing heartbeat replies tell."""
    timeout = 2.0

    async def run(addr: str) -> tuple[float, BaseException]:
        async with await AsyncClient.connect(addr, timeout=30, heartbeat_timeout=timeout) as client:
            server_pid = int((await client.stats())["coordinator_pid"])
            generate = asyncio.ensure_future(client.generate([4, 5, 6], LONG))
            await until_in_flight(client, 1)
            os.kill(server_pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(RequestError) as info:
                    await asyncio.wait_for(generate, timeout + MARGIN_S)
                return time.monotonic() - t0, info.value
            finally:
                os.kill(server_pid, signal.SIGCONT)

    with cluster("tiny-llama", 1, 1, 0, *SIM) as addr:
        elapsed, error = asyncio.run(run(addr))
        with Client(addr, timeout=30) as client:  # the server itself is fine once resumed
            assert client.generate([1], SamplingParams(max_tokens=3, ignore_eos=True)).finish_reason == "length"
    assert_unreachable(error, addr, timeout)
    assert timeout / 4 < elapsed < timeout + MARGIN_S  # a PING went unanswered for (timeout - interval)


@pytest.mark.parametrize("auth", [False, True], ids=["plain", "curve"])
def test_an_idle_or_slow_server_is_not_declared_dead(cluster, tmp_path: Path, auth: bool) -> None:  # type: ignore[no-untyped-def]
    """With a 1 s heartbeat timeout: silent for several timeouts, yet alive (CURVE too)."""
    timeout = 1.0
    keys = tmp_path / "keys"
    extra: tuple[str, ...] = ()
    if auth:
        generate_keys(keys)
        extra = ("--auth", "curve", "--keys", str(keys))
    with cluster("tiny-llama", 1, 1, 0, *SIM, *extra) as addr:
        with Client(addr, timeout=30, heartbeat_timeout=timeout, auth_keys=keys if auth else None) as client:
            # 1. Idle: no message either way for three timeouts (only heartbeats).
            time.sleep(3 * timeout)
            assert client.stats()["workers_alive"] == 2
            # 2. Slow: one generate whose reply takes several timeouts, nothing sent meanwhile.
            t0 = time.monotonic()
            done = client.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
            assert done.finish_reason == "length" and len(done.token_ids) == 200
            assert time.monotonic() - t0 > 3 * timeout, "the request was not slow enough to test anything"


def test_heartbeat_timeout_is_validated() -> None:
    for bad in (0, 0.05, -1.0, float("nan"), float("inf"), 4000.0, True, "10"):
        with pytest.raises(ValueError, match=r"heartbeat_timeout must be a number of seconds from 0.1 to 3600"):
            AsyncClient("tcp://127.0.0.1:1", heartbeat_timeout=bad)  # type: ignore[arg-type]
    assert AsyncClient("tcp://127.0.0.1:1").heartbeat_timeout == DEFAULT_TIMEOUT_S

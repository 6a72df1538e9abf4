"""A coordinator loop that crashes stops the cluster with exit status 1 and its error printed,
instead of a cluster that looks up but answers nothing."""

from __future__ import annotations

import asyncio

import pytest

from ecoserve.config import CoordinatorConfig
from ecoserve.launcher import serve_until_stopped


class CrashingCoordinator:
    client_addr = "tcp://127.0.0.1:1"
    ready = True

    def __init__(self) -> None:
        self.stopped = self.closed = self.drained = False

    async def serve(self) -> None:
        await asyncio.sleep(0.3)
        raise KeyError("r42")

    async def drain(self, timeout_s: float) -> None:
        self.drained = True

    def worker_lost(self, rank: int, reason: str) -> None:
        raise AssertionError("no workers here")

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.closed = True


def test_a_crashed_coordinator_loop_ends_the_cluster_with_its_error(capsys: pytest.CaptureFixture[str]) -> None:
    coord = CrashingCoordinator()
    code = asyncio.run(asyncio.wait_for(
        serve_until_stopped(coord, [], CoordinatorConfig(), "ranks: none", None), timeout=30,  # type: ignore[arg-type]
    ))
    assert code == 1
    assert coord.stopped and coord.closed and not coord.drained
    assert "error: the coordinator stopped: KeyError: 'r42'" in capsys.readouterr().err

"""Starts real clusters with `ecoserve serve` in a subprocess, as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 240.0

ClusterFactory = Callable[..., contextlib.AbstractContextManager[str]]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of someone else still answers kill(0); check its state.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@contextlib.contextmanager
def run_cluster(
    tmp_path: Path, model: str = "tiny-llama", prefill: int = 1, decode: int = 1, mixed: int = 0, *extra: str
) -> Iterator[str]:
    """Yield the client address of a running `ecoserve serve`; on exit SIGTERM it and check that
    it exits cleanly and leaves no worker process behind."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    log = open(tmp_path / f"serve-{time.monotonic_ns()}.log", "w+")
    cmd = [
        sys.executable, "-m", "ecoserve.cli", "serve", "--model", model, "--dtype", "float32", "--device", "cpu",
        "--prefill", str(prefill), "--decode", str(decode), "--mixed", str(mixed), "--port", "0",
        "--threads-per-worker", "1", "--ready-file", str(ready), *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"ecoserve serve did not come up (exit {proc.poll()}):\n{log.read()[-4000:]}")
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == prefill + decode + mixed, f"expected one process per rank, got {workers}"
        yield ready.read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.seek(0)
        assert code == 0, f"ecoserve serve exited with {code}:\n{log.read()[-4000:]}"
        left = [pid for pid in workers if _alive(pid)]
        assert not left, f"worker processes left behind: {left}"
    finally:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def cluster(tmp_path: Path) -> ClusterFactory:
    def factory(*args: object, **kwargs: object) -> contextlib.AbstractContextManager[str]:
        return run_cluster(tmp_path, *args, **kwargs)  # type: ignore[arg-type]

    return factory

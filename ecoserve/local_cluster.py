"""Run `ecoserve serve` in a subprocess, as a user would, for benchmarks and tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

STARTUP_TIMEOUT_S = 300.0


class ClusterError(RuntimeError):
    """The cluster did not start, did not stop cleanly, or left worker processes behind."""


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def local_cluster(
    model: str = "tiny-llama", prefill: int = 1, decode: int = 1, mixed: int = 0, *extra: str,
    log_dir: Path | None = None, dtype: str = "float32", device: str = "cpu",
) -> Iterator[str]:
    """Yield the client address of a running `ecoserve serve`. On exit: SIGTERM, then raise
    ClusterError unless it exited with 0 and left no worker process behind."""
    with contextlib.ExitStack() as stack:
        folder = Path(log_dir) if log_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        ready = folder / f"ready-{os.getpid()}-{time.monotonic_ns()}"
        log: IO[str] = stack.enter_context(open(folder / f"serve-{time.monotonic_ns()}.log", "w+"))
        cmd = [
            sys.executable, "-m", "ecoserve.cli", "serve", "--model", model, "--dtype", dtype, "--device", device,
            "--prefill", str(prefill), "--decode", str(decode), "--mixed", str(mixed), "--port", "0",
            "--ready-file", str(ready), *extra,
        ]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        workers: list[int] = []
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ClusterError(f"ecoserve serve did not come up (exit {proc.poll()}):\n{_tail(log)}")
                time.sleep(0.1)
            workers = child_pids(proc.pid)
            front_door = "--http-port" in extra or "--metrics-port" in extra  # one process serves both
            if len(workers) != prefill + decode + mixed + front_door:
                raise ClusterError(f"expected one process per rank, found {workers}")
            yield ready.read_text()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(90)
            if code != 0:
                raise ClusterError(f"ecoserve serve exited with {code}:\n{_tail(log)}")
            left = [pid for pid in workers if is_running(pid)]
            if left:
                raise ClusterError(f"worker processes left behind: {left}")
        finally:
            if proc.poll() is None:
                for pid in workers or child_pids(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


def _tail(log: IO[str], chars: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]

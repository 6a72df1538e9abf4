"""A launcher killed during start-up takes its workers with it within seconds, instead of
leaving them loading and waiting for a registration reply for minutes (ecoserve/runtime/parent.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ecoserve.local_cluster import child_pids, is_running

ORPHAN_BOUND_S = 5.0  # the promise is 1 s; the rest is slack for a loaded test machine


def test_workers_die_with_a_launcher_killed_during_startup(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    cmd = [
        sys.executable, "-m", "ecoserve.cli", "serve", "--model", "tiny-llama", "--device", "cpu", "--port", "0",
        "--threads-per-worker", "1", "--ready-file", str(ready),
    ]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        # 1. Wait for both worker processes to exist, then freeze the launcher: stopped, it can
        #    neither answer a registration nor write the ready file, so we are in start-up.
        deadline = time.monotonic() + 120
        while len(workers) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, "the launcher never started 2 workers"
            workers = child_pids(launcher.pid)
            time.sleep(0.02)
        launcher.send_signal(signal.SIGSTOP)
        assert not ready.exists(), "the cluster became ready before the launcher was stopped"
        assert all(is_running(pid) for pid in workers)
        # 2. Kill the launcher outright: no handler, no drain, no reaping of its children.
        launcher.kill()
        launcher.wait(10)
        # 3. Every worker is gone within the bound.
        deadline = time.monotonic() + ORPHAN_BOUND_S
        while any(is_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in workers if is_running(pid)]
        assert not left, f"workers {left} outlived their launcher by more than {ORPHAN_BOUND_S} s"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()

"""How much CPU processes got on a shared machine (Linux): for benchmarks whose timings mean
little without it.

- `cpu_time(pid)`: a process's time on a CPU and its time runnable but waiting for one
  (`/proc/PID/task/*/schedstat`), for its main thread and for all its threads.
- `CPUProbe`: a separate process that, every `period_s`, spins for `spin_s` and records the
  share of a CPU it got (its thread CPU time / wall time). What one busy thread could get at
  that moment, measured independently of what is being timed.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CPUTime:
    """Seconds a process spent on a CPU and runnable but waiting for one: its main thread (a
    worker's steps run there) and all its threads together."""

    main_run_s: float
    main_wait_s: float
    all_run_s: float
    all_wait_s: float

    def __sub__(self, other: CPUTime) -> CPUTime:
        return CPUTime(self.main_run_s - other.main_run_s, self.main_wait_s - other.main_wait_s,
                       self.all_run_s - other.all_run_s, self.all_wait_s - other.all_wait_s)

    @property
    def stretch(self) -> float:
        """(running + waiting) / running of the main thread. Waits after idle wake-ups count too,
        so for a mostly idle process this overstates how much its work was slowed."""
        return (self.main_run_s + self.main_wait_s) / self.main_run_s if self.main_run_s > 0 else 1.0


def cpu_time(pid: int) -> CPUTime | None:
    """The process's schedstat totals now; None if it is gone or the kernel keeps none."""
    run = wait = main_run = main_wait = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "schedstat").read_text().split()
            r, w = int(fields[0]) / 1e9, int(fields[1]) / 1e9
            run, wait = run + r, wait + w
            if task.name == str(pid):
                main_run, main_wait = r, w
    except (OSError, IndexError, ValueError):
        return None
    return CPUTime(main_run, main_wait, run, wait)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages ([] where /proc has none)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def _probe(period_s: float, spin_s: float, conn: Connection) -> None:
    shares: list[float] = []
    while True:  # spin first: a short run gets one sample too
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        while time.perf_counter() - wall0 < spin_s:
            pass
        shares.append((time.thread_time() - cpu0) / (time.perf_counter() - wall0))
        if conn.poll(period_s - spin_s):  # asleep in between: no load of its own
            break
    conn.send(shares)


class CPUProbe:
    """`with CPUProbe() as probe: ...` then `probe.shares`: the CPU share of each spin."""

    def __init__(self, period_s: float = 2.0, spin_s: float = 0.2) -> None:
        if not 0 < spin_s < period_s:
            raise ValueError(f"need 0 < spin_s < period_s, got {spin_s}, {period_s}")
        self.period_s, self.spin_s = period_s, spin_s
        self.shares: list[float] = []

    def __enter__(self) -> CPUProbe:
        ctx = mp.get_context("spawn")  # no copy of the caller's sockets or event loop
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_probe, args=(self.period_s, self.spin_s, child), daemon=True)
        self._proc.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._conn.send(None)
        if self._conn.poll(self.period_s + 30):
            self.shares = self._conn.recv()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    @property
    def mean_share(self) -> float:
        """The mean share over the spins (1.0 when none ran): work needing C CPU seconds took
        about C / mean_share seconds of wall time over the probed span."""
        return sum(self.shares) / len(self.shares) if self.shares else 1.0

"""`ecoserve bench sim-fidelity`'s figures: measured against simulated latencies, where the
real workers' time went (Linux schedstat), the table and the JSON document.

Both sides' percentiles are taken the same way (numpy's linear interpolation) over the same
requests: TTFT and E2E over every request, TPOT over those with more than one output token.
The error of a figure is (simulated - measured) / measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ecoserve.bench.report import print_table

# (key, label): the figures the issue names, in table order
FIGURES = (
    ("ttft_p50", "TTFT p50"), ("ttft_p90", "TTFT p90"), ("tpot_p50", "TPOT p50"), ("tpot_p90", "TPOT p90"),
    ("jct_mean", "JCT mean"),
)


@dataclass(frozen=True)
class Latencies:
    """One side's per-request latencies (ms), in request order; TPOT is None for one token."""

    ttft_ms: list[float]
    tpot_ms: list[float | None]
    e2e_ms: list[float]

    def figures(self) -> dict[str, float]:
        tpot = [t for t in self.tpot_ms if t is not None]
        return {
            "ttft_p50": _pct(self.ttft_ms, 50), "ttft_p90": _pct(self.ttft_ms, 90),
            "tpot_p50": _pct(tpot, 50), "tpot_p90": _pct(tpot, 90),
            "jct_mean": float(np.mean(self.e2e_ms)) if self.e2e_ms else math.nan,
        }


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    measured_ms: float
    simulated_ms: float

    @property
    def error(self) -> float:
        """Signed relative error of the simulated figure."""
        if not self.measured_ms or math.isnan(self.measured_ms) or math.isnan(self.simulated_ms):
            return math.nan
        return (self.simulated_ms - self.measured_ms) / self.measured_ms

    def within(self, tolerance: float) -> bool:
        return abs(self.error) <= tolerance


def compare(measured: Latencies, simulated: Latencies) -> list[Row]:
    m, s = measured.figures(), simulated.figures()
    return [Row(key, label, m[key], s[key]) for key, label in FIGURES]


# --- where the real workers' time went ----------------------------------------------------------


@dataclass(frozen=True)
class CPUTime:
    """Seconds one process spent on a CPU and runnable but waiting for one (Linux schedstat):
    its main thread (where a worker computes its steps) and all its threads together."""

    main_run_s: float
    main_wait_s: float
    all_run_s: float
    all_wait_s: float

    def __sub__(self, other: CPUTime) -> CPUTime:
        return CPUTime(self.main_run_s - other.main_run_s, self.main_wait_s - other.main_wait_s,
                       self.all_run_s - other.all_run_s, self.all_wait_s - other.all_wait_s)

    @property
    def stretch(self) -> float:
        """(running + waiting) / running of the main thread: how much longer its work took than
        it would have on a core of its own, by waiting for one alone."""
        return (self.main_run_s + self.main_wait_s) / self.main_run_s if self.main_run_s > 0 else 1.0


def cpu_time(pid: int) -> CPUTime | None:
    """The process's schedstat totals now; None if it is gone or the kernel does not keep them."""
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
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


# --- output --------------------------------------------------------------------------------------


def print_comparison(title: str, rows: Sequence[Row], tolerance: float) -> None:
    print_table(title, ["metric", "measured ms", "simulated ms", "error %", f"within {tolerance:.0%}?"], [
        (r.label, r.measured_ms, r.simulated_ms, f"{100 * r.error:+.1f}", "yes" if r.within(tolerance) else "no")
        for r in rows
    ])


def print_split(measured: dict[str, float], simulated: dict[str, float]) -> None:
    """Mean TTFT split and first-token-to-decoding gap, as the coordinator timed them."""
    rows = [(name, measured[key], simulated[key]) for key, name in (
        ("queue_ms", "queued at the coordinator"), ("prefill_ms", "dispatch -> first token"),
        ("transfer_ms", "first token -> decoding"),
    )]
    print_table("Where TTFT goes (mean ms, coordinator's clock)", ["phase", "measured", "simulated"], rows)


def print_cpu(cpu: dict[str, dict[str, float]]) -> None:
    rows = [
        (name, c["run_s"], c["wait_s"], c["stretch"], c.get("sim_busy_s", "-"))
        for name, c in cpu.items()
    ]
    print_table(
        "Real run: CPU time of each process (main thread) against the simulated busy time",
        ["process", "on a CPU s", "waiting for one s", "stretch", "simulated busy s"], rows,
    )


def summary(rows: Sequence[Row], tolerance: float, **extra: Any) -> dict[str, Any]:
    """The flat `summary`: every figure measured, simulated and its error, and the verdict."""
    out: dict[str, Any] = {}
    for r in rows:
        out[f"{r.key}_measured_ms"] = r.measured_ms
        out[f"{r.key}_sim_ms"] = r.simulated_ms
        out[f"{r.key}_error"] = r.error
    out["max_abs_error"] = max((abs(r.error) for r in rows), default=math.nan)
    out["tolerance"] = tolerance
    out["within_tolerance"] = all(r.within(tolerance) for r in rows)
    return out | extra


def mean_of(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else math.nan

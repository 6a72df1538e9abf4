"""`ecoserve bench sim-fidelity`'s figures: measured against simulated latencies, the tables
and the per-request rows of the JSON document.

Both sides' figures are taken the same way (numpy's linear-interpolation percentiles) over the
same requests: TTFT and E2E (JCT) over every request, TPOT over those with more than one output
token. The error of a figure is (simulated - measured) / measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ecoserve.report import print_table
from ecoserve.data.workload import WorkloadRequest

# (key, label): the figures the issue names, in table order
FIGURES = (
    ("ttft_p50", "TTFT p50"), ("ttft_p90", "TTFT p90"), ("tpot_p50", "TPOT p50"), ("tpot_p90", "TPOT p90"),
    ("jct_mean", "JCT mean"),
)
SPLIT = (("queue_ms", "queued at the coordinator"), ("prefill_ms", "dispatch -> first token"),
         ("transfer_ms", "first token -> decoding"))


@dataclass(frozen=True)
class Latencies:
    """One side's per-request latencies (ms); TPOT is None for a one-token output."""

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


def measured(result: Any) -> Latencies:
    """From `bench serve`'s BenchResult: client-side times of the requests that completed."""
    ok = [r for r in result.requests if r.status == "ok" and r.token_times]
    return Latencies([r.ttft_ms for r in ok], [r.tpot_ms for r in ok], [r.e2e_ms for r in ok])


def simulated(res: Any) -> Latencies:
    """From a SimResult: the requests that finished."""
    done = [r for r in res.requests if r.finish_reason != "error"]
    return Latencies([r.ttft_ms for r in done], [r.tpot_ms if r.output_len > 1 else None for r in done],
                     [r.e2e_ms for r in done])


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


def compare(real: Latencies, sim: Latencies) -> list[Row]:
    m, s = real.figures(), sim.figures()
    return [Row(key, label, m[key], s[key]) for key, label in FIGURES]


def same_requests(requests: Sequence[WorkloadRequest], result: Any, res: Any) -> bool:
    """Both sides ran every request in full, with its arrival time, prompt and output length."""
    real = sorted(result.requests, key=lambda r: r.index)
    if len(real) != len(requests) or len(res.requests) != len(requests):
        return False
    base = requests[0].arrival_s
    for i, (want, m, x) in enumerate(zip(requests, real, res.requests)):
        lengths = (want.prompt_len, want.output_len)
        if m.index != i or m.status != "ok" or (m.prompt_len, m.num_output_tokens) != lengths:
            return False
        if (x.prompt_len, x.output_len) != lengths:
            return False
        if abs(m.arrival_s - (want.arrival_s - base)) > 1e-6 or abs(x.arrival_s - want.arrival_s) > 1e-6:
            return False
    return True


def request_rows(requests: Sequence[WorkloadRequest], result: Any, res: Any) -> list[dict[str, Any]]:
    """One row per request: its shape, and each side's latencies and TTFT split."""
    sim = {round(r.arrival_s, 9): r for r in res.requests}  # a finished request by its arrival
    out = []
    for i, (want, m) in enumerate(zip(requests, sorted(result.requests, key=lambda r: r.index))):
        x = sim.get(round(want.arrival_s, 9))
        out.append({
            "index": i, "arrival_s": want.arrival_s, "prompt_len": want.prompt_len, "output_len": want.output_len,
            "measured": {"status": m.status, "ttft_ms": m.ttft_ms, "tpot_ms": m.tpot_ms, "e2e_ms": m.e2e_ms,
                         "queue_ms": m.server_queue_ms, "prefill_ms": m.server_prefill_ms,
                         "transfer_ms": m.server_transfer_ms, "output_tokens": m.num_output_tokens},
            "simulated": None if x is None else {
                "ttft_ms": x.ttft_ms, "tpot_ms": x.tpot_ms, "e2e_ms": x.e2e_ms, "queue_ms": x.queue_ms,
                "prefill_ms": x.prefill_ms, "transfer_ms": x.transfer_ms, "output_tokens": x.output_len},
        })
    return out


def split_means(result: Any, res: Any) -> dict[str, dict[str, float]]:
    """Mean TTFT split and first-token-to-decoding gap, as each side's coordinator timed them."""
    def mean(values: list[float | None]) -> float:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else math.nan

    return {
        "measured": {k: mean([getattr(r, f"server_{k}") for r in result.requests]) for k, _ in SPLIT},
        "simulated": {k: mean([getattr(r, k) for r in res.requests]) for k, _ in SPLIT},
    }


# --- the profile on the real run's batches ------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One real step, rebuilt from the client's token receipt times."""

    size: int
    sum_len: int  # prefill: Σ prompt lengths; decode: Σ contexts (cached tokens + 1)
    sum_sq: int  # prefill: Σ prompt lengths²; decode: unused (0)
    max_len: int  # decode: the longest context
    wall_s: float | None = None  # decode: since the step before, when both ran one same request


def real_batches(result: Any, gap_s: float) -> tuple[list[Batch], list[Batch]]:
    """(prefill steps, decode steps) of a cluster with one worker of each role, from when each
    token reached the client. A step's tokens leave together and arrive in order, so a decode
    step ends where a request shows up again or nothing came for `gap_s`; a prefill step (the
    first tokens) where nothing came for `gap_s`. A prompt chunked over two steps counts whole
    in the second, which moves its share of per-step cost but not of per-token cost."""
    ok = [r for r in result.requests if r.status == "ok"]
    firsts = sorted((r.token_times[0], r.prompt_len) for r in ok if r.token_times)
    prefill: list[list[int]] = []
    last = -math.inf
    for t, prompt in firsts:
        if t - last > gap_s:
            prefill.append([])
        prefill[-1].append(prompt)
        last = t
    tokens = sorted((t, r.index, r.prompt_len + j) for r in ok for j, t in enumerate(r.token_times) if j >= 1)
    decode: list[dict[int, int]] = []
    starts: list[float] = []  # when each step's first token came
    last = -math.inf
    for t, index, ctx in tokens:  # the step producing output token j reads prompt + j keys
        if not decode or index in decode[-1] or t - last > gap_s:
            decode.append({})
            starts.append(t)
        decode[-1][index] = ctx
        last = t
    steps = []
    for k, d in enumerate(decode):
        # A request in both this step and the one before kept the worker busy in between.
        wall = starts[k] - starts[k - 1] if k and decode[k - 1].keys() & d.keys() else None
        steps.append(Batch(len(d), sum(d.values()), 0, max(d.values()), wall))
    return [Batch(len(p), sum(p), sum(n * n for n in p), max(p)) for p in prefill], steps


def back_to_back(profile: Any, decode: Sequence[Batch]) -> tuple[int, float, float]:
    """(steps, their wall seconds, the profile's seconds for them) over the decode steps that
    followed another without a pause: the live loop's time per step against the model's."""
    timed = [b for b in decode if b.wall_s is not None]
    return (len(timed), sum(b.wall_s or 0.0 for b in timed),
            sum(profile.decode_ms(b.size, b.sum_len, b.max_len) for b in timed) / 1e3)


def profile_cpu_s(profile: Any, prefill: Sequence[Batch], decode: Sequence[Batch]) -> tuple[float, float]:
    """Seconds the profile gives the real run's prefill and decode steps."""
    return (sum(profile.prefill_ms(b.sum_len, b.sum_sq) for b in prefill) / 1e3,
            sum(profile.decode_ms(b.size, b.sum_len, b.max_len) for b in decode) / 1e3)


# --- output --------------------------------------------------------------------------------------


def print_comparison(title: str, rows: Sequence[Row], tolerance: float) -> None:
    print_table(title, ["metric", "measured ms", "simulated ms", "error %", f"within {tolerance:.0%}?"], [
        (r.label, r.measured_ms, r.simulated_ms, f"{100 * r.error:+.1f}", "yes" if r.within(tolerance) else "no")
        for r in rows
    ])


def print_split(split: dict[str, dict[str, float]]) -> None:
    """Columns: each side of `split_means`, and any other simulation added to it."""
    print_table("Where the time before decoding goes (mean ms, each coordinator's clock)",
                ["phase", *(name.replace("_", " ") for name in split)],
                [(label, *(c[k] for c in split.values())) for k, label in SPLIT])


def print_cpu(cpu: dict[str, dict[str, Any]]) -> None:
    print_table(
        "Real run: each process's main thread (s); the profile on its rebuilt steps; the simulated busy time",
        ["process", "on a CPU", "waiting for one", "steps", "profile on them", "simulated busy"],
        [(name, c["run_s"], c["wait_s"], c.get("real_steps", "-"), c.get("profile_on_real_steps_s", "-"),
          c.get("sim_busy_s", "-")) for name, c in cpu.items()],
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

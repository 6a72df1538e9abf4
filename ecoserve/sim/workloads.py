"""Named workloads for the simulator and the comparisons (no torch, no tokenizer at run time).

- `sharegpt`: first human turn and first reply of ShareGPT conversations, as token lengths
  by the default model's tokenizer (SmolLM2's; OPT's tokenizer cannot be had offline, and both
  are byte-level BPEs of similar granularity). Lengths are precomputed into a bundled file by
  `python -m ecoserve.sim.lengths` (text never ships twice).
- `humaneval`: HumanEval prompts and their reference solutions' lengths (code completion),
  precomputed the same way.
- `azure-conv`, `azure-code`: the Azure LLM inference traces 2023 (CC-BY; see
  data/traces/README.md): their own token counts, their own arrival times (`rate=None`) or
  Poisson arrivals at `rate`.
- `summarization`: a long-prompt shape (lognormal prompts of mean 1,700 tokens and outputs of
  mean 90, like DistServe's LongBench summarisation; our synthetic stand-in, not the data).

Every workload longer than its source cycles through it (Azure traces keep their inter-arrival
gaps, offset by the span of the trace per pass).
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from importlib import resources

from ecoserve.data.azure import load_azure_trace
from ecoserve.data.synthetic import synthetic_requests, with_arrivals
from ecoserve.data.workload import WorkloadRequest

WORKLOADS = ("sharegpt", "humaneval", "azure-conv", "azure-code", "summarization")
LENGTH_FILES = {"sharegpt": "sharegpt_smollm2.csv", "humaneval": "humaneval_smollm2.csv"}
MAX_TOTAL_LEN = 2048  # OPT's context: longer pairs are dropped, as DistServe does


def make_workload(name: str, num_requests: int, rate: float | None, seed: int = 0) -> list[WorkloadRequest]:
    """`num_requests` requests of workload `name`; Poisson arrivals at `rate` per second, or
    the trace's own arrival times when `rate` is None (Azure traces only)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if name == "summarization":
        base = synthetic_requests(num_requests, rate or 1.0, prompt_mean=1700, prompt_sigma=0.35, output_mean=90,
                                  output_sigma=0.5, seed=seed)
        base = [r for r in base if r.total_len <= MAX_TOTAL_LEN] or base[:1]
    elif name.startswith("azure-"):
        base = list(_azure(name.removeprefix("azure-")))
    else:
        base = list(_lengths(name))
    out = _cycle(base, num_requests, keep_times=rate is None and name.startswith("azure-"))
    if rate is None:
        if not name.startswith("azure-"):
            raise ValueError(f"workload {name!r} has no arrival times of its own: give a rate")
        return out
    return with_arrivals(out, rate, seed=seed)


def _cycle(base: list[WorkloadRequest], n: int, keep_times: bool) -> list[WorkloadRequest]:
    if not keep_times:
        return [base[i % len(base)] for i in range(n)]
    span = base[-1].arrival_s + (base[-1].arrival_s / max(1, len(base) - 1))
    return [
        WorkloadRequest(base[i % len(base)].arrival_s + span * (i // len(base)), base[i % len(base)].prompt_len,
                        base[i % len(base)].output_len)
        for i in range(n)
    ]


@lru_cache(maxsize=None)
def _azure(kind: str) -> tuple[WorkloadRequest, ...]:
    rows = [r for r in load_azure_trace(kind) if r.total_len <= MAX_TOTAL_LEN and r.output_len >= 1]
    return tuple(rows)


@lru_cache(maxsize=None)
def _lengths(name: str) -> tuple[WorkloadRequest, ...]:
    folder = resources.files("ecoserve.data").joinpath("lengths")
    entry = folder.joinpath(LENGTH_FILES[name])
    if not entry.is_file():
        raise ValueError(f"the {name} length file is missing from the package; build it with "
                         "`python -m ecoserve.sim.lengths`")
    rows = csv.DictReader(io.StringIO(entry.read_text(encoding="utf-8")))
    out = tuple(WorkloadRequest(0.0, int(r["prompt_len"]), int(r["output_len"])) for r in rows)
    return tuple(r for r in out if r.total_len <= MAX_TOTAL_LEN)

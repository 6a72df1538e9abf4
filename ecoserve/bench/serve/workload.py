"""The requests of `ecoserve bench serve`: a named workload, re-timed by an arrival process (or
replayed on the trace's own clock), with lengths clipped to what the server accepts.

Traces without text (Azure, synthetic) become prompts of seeded random token ids of the
trace's length; text workloads (ShareGPT, HumanEval) send their text, counted with the
server's own tokenizer so that the lengths here are the lengths the server sees.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ecoserve.client.types import ServerInfo
from ecoserve.data.azure import load_azure_trace
from ecoserve.data.humaneval import humaneval_requests
from ecoserve.data.sharegpt import sharegpt_requests
from ecoserve.data.synthetic import ARRIVALS, synthetic_requests, with_arrivals
from ecoserve.data.workload import TokenEncoder, WorkloadRequest, check_count, check_optional_len

WORKLOADS = ("azure-conv", "azure-code", "sharegpt", "humaneval", "synthetic")
TRACE_KINDS = {"azure-conv": "conv", "azure-code": "code"}  # the workloads with arrival times
TEXT_WORKLOADS = ("sharegpt", "humaneval")
# Random prompt ids start here: the tokenizers EcoServe ships keep their special tokens at the
# lowest ids (SmolLM2's are 0-16), and a random <|im_end|> in a prompt is not a realistic one.
FIRST_PLAIN_ID = 1000


@dataclass(frozen=True)
class ArrivalSpec:
    """When requests arrive: a process at `rate` per second (`arrival` "poisson" or "gamma"
    with coefficient of variation `cv`), or with `replay` the trace's own timestamps with
    every gap multiplied by `time_scale` (0.1 replays ten times faster)."""

    rate: float = 1.0
    arrival: str = "poisson"
    cv: float = 1.0
    replay: bool = False
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"unknown arrival process {self.arrival!r}; allowed: {', '.join(ARRIVALS)}")
        if not self.rate > 0:  # also NaN
            raise ValueError(f"rate must be > 0 requests/s (inf sends every request at once), got {self.rate}")
        if not (math.isfinite(self.cv) and self.cv > 0):
            raise ValueError(f"cv must be a finite number > 0, got {self.cv}")
        if self.arrival == "poisson" and self.cv != 1.0:
            raise ValueError(f"cv={self.cv} needs --arrival gamma (Poisson arrivals have cv 1)")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time scale must be a finite number > 0, got {self.time_scale}")


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send: `num_requests` of workload `name` (one of WORKLOADS)."""

    name: str
    num_requests: int
    arrivals: ArrivalSpec = ArrivalSpec()
    seed: int = 0
    trace_file: Path | None = None  # an Azure-format CSV instead of the bundled trace
    max_prompt_len: int | None = None  # caps below the server's own limits
    max_output_len: int | None = None
    prompt_mean: float = 256.0  # synthetic lengths (lognormal means, tokens)
    output_mean: float = 128.0

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"unknown workload {self.name!r}; allowed: {', '.join(WORKLOADS)}")
        check_count("num-requests", self.num_requests)
        check_optional_len("max_prompt_len", self.max_prompt_len)
        check_optional_len("max_output_len", self.max_output_len)
        if self.trace_file is not None:
            if self.name not in TRACE_KINDS:
                raise ValueError(f"a trace file applies to {' and '.join(TRACE_KINDS)}, not {self.name!r}")
            if not Path(self.trace_file).is_file():
                raise FileNotFoundError(f"trace file {self.trace_file} does not exist (expected an Azure-format CSV)")
        if self.arrivals.replay and self.name not in TRACE_KINDS:
            raise ValueError(
                f"only {' and '.join(TRACE_KINDS)} have timestamps to replay; give {self.name!r} a --rate instead"
            )


@dataclass(frozen=True)
class Workload:
    """The requests to send, in arrival order, and what fitting them to the server changed."""

    requests: list[WorkloadRequest]
    clipped_prompts: int  # token-id prompts shortened to the server's prompt limit
    clipped_outputs: int  # outputs shortened to fit the context, the KV pool or max_output_len
    dropped: int  # text prompts over the limit (text cannot be clipped to a token count)


def build_workload(spec: WorkloadSpec, server: ServerInfo, tokenizer: TokenEncoder | None = None) -> Workload:
    """The requests of `spec`, fitted to `server`'s limits. Text workloads need `tokenizer`
    (the server's: see `ecoserve.coordinator.frontend.TextCodec`) to count their tokens."""
    if spec.name in TEXT_WORKLOADS and tokenizer is None:
        raise ValueError(f"the {spec.name} workload needs the model's tokenizer to count its tokens")
    cap = spec.max_prompt_len or server.max_prompt_tokens
    max_prompt = min(server.max_prompt_tokens, server.max_request_tokens - 1, cap)
    if max_prompt < 1:
        raise ValueError(f"the server accepts no prompt (limits {server}); is every worker up?")
    raw = _load(spec, max_prompt, server.max_request_tokens, tokenizer)
    return _fit(_retime(raw, spec), max_prompt, server, spec.max_output_len)


def prompt_token_ids(index: int, length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """[length] random token ids for request `index`, the same for the same arguments."""
    low = min(FIRST_PLAIN_ID, vocab_size // 2)
    rng = np.random.default_rng([seed, 3, index])  # streams 0-2 are synthetic.py's
    return [int(t) for t in rng.integers(low, vocab_size, size=length)]


def prompts_for(requests: Sequence[WorkloadRequest], vocab_size: int, seed: int = 0) -> list[str | list[int]]:
    """Each request's text, or token ids of its `prompt_len` when it has none."""
    if vocab_size < 2 and any(r.prompt is None for r in requests):
        raise ValueError(f"cannot build token-id prompts for a vocabulary of {vocab_size}; is every worker up?")
    return [
        r.prompt if r.prompt is not None else prompt_token_ids(i, r.prompt_len, vocab_size, seed)
        for i, r in enumerate(requests)
    ]


def _load(spec: WorkloadSpec, max_prompt: int, max_total: int, tokenizer: TokenEncoder | None) -> list[WorkloadRequest]:
    n, a = spec.num_requests, spec.arrivals
    if spec.name in TRACE_KINDS:
        rows = load_azure_trace(TRACE_KINDS[spec.name], limit=n, path=spec.trace_file)
        if len(rows) < n:
            raise ValueError(f"the {spec.name} trace has only {len(rows)} requests; ask for at most that many")
        return rows
    if spec.name == "synthetic":
        return synthetic_requests(
            n, a.rate, a.arrival, a.cv, prompt_mean=spec.prompt_mean, output_mean=spec.output_mean, seed=spec.seed
        )
    assert tokenizer is not None
    if spec.name == "sharegpt":  # pairs over the limits are skipped while sampling, as in vLLM
        return sharegpt_requests(tokenizer, n, spec.seed, max_prompt_len=max_prompt, max_total_len=max_total)
    return humaneval_requests(tokenizer, n, spec.seed)


def _retime(requests: list[WorkloadRequest], spec: WorkloadSpec) -> list[WorkloadRequest]:
    a = spec.arrivals
    if a.replay:
        return [dataclasses.replace(r, arrival_s=r.arrival_s * a.time_scale) for r in requests]
    if spec.name == "synthetic":  # already drawn with these arrivals
        return requests
    return with_arrivals(requests, a.rate, a.arrival, a.cv, spec.seed)


def _fit(requests: list[WorkloadRequest], max_prompt: int, server: ServerInfo, max_output: int | None) -> Workload:
    fitted: list[WorkloadRequest] = []
    clipped_prompts = clipped_outputs = dropped = 0
    for r in requests:
        prompt_len = min(r.prompt_len, max_prompt)
        if prompt_len < r.prompt_len and r.prompt is not None:
            dropped += 1
            continue
        clipped_prompts += prompt_len < r.prompt_len
        room = min(server.max_model_len, server.max_request_tokens) - prompt_len
        output_len = min(r.output_len, room, max_output or r.output_len)
        clipped_outputs += output_len < r.output_len
        fitted.append(dataclasses.replace(r, prompt_len=prompt_len, output_len=output_len))
    return Workload(fitted, clipped_prompts, clipped_outputs, dropped)

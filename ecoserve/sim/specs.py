"""What a headline run names: the policy spec (`vllm:prefill-priority`) and its label, the seeds
and the spread of a figure over them, and the settings line every table opens with.

A policy spec is a policy name plus `make_policy` options, `name[:opt[:opt...]]`, each `opt` a
`key=value` or a bare value meaning `mode=value`: `vllm`, `vllm:prefill-priority` (=
`vllm:mode=prefill-priority`), `ecoserve:predictor=histogram`. Specs are parsed here only.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from ecoserve.config import parse_option

# How tables name a spec whose policy has modes; the others print as given.
LABELS = {
    "vllm": "vllm (chunked prefill)",
    "vllm:mode=chunked": "vllm (chunked prefill)",
    "vllm:mode=prefill-priority": "vllm (prefill-priority)",
}


@dataclass(frozen=True)
class PolicySpec:
    """A policy name and the `make_policy` options the spec gave."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def canonical(self) -> str:
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.options)])

    @property
    def label(self) -> str:
        return LABELS.get(self.canonical, self.canonical)


def parse_policy(spec: str) -> PolicySpec:
    """`vllm:prefill-priority` -> PolicySpec("vllm", (("mode", "prefill-priority"),))."""
    name, *opts = spec.strip().split(":")
    if not name:
        raise ValueError(f"a policy spec must start with a policy name (name[:option...]), got {spec!r}")
    options: dict[str, Any] = {}
    for opt in opts:
        key, value = parse_option(opt) if "=" in opt else ("mode", opt)
        if key in options:
            raise ValueError(f"policy spec {spec!r} gives {key!r} twice")
        options[key] = value
    return PolicySpec(name, tuple(options.items()))


def policy_label(spec: str) -> str:
    """How tables name a policy spec: `vllm` -> `vllm (chunked prefill)`."""
    return parse_policy(spec).label


def parse_policies(text: str) -> list[str]:
    """A comma-separated list of specs (checked here, kept as written: they key the JSON)."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError("--policies must name at least one policy")
    for s in specs:
        parse_policy(s)
    return specs


def seed_list(first: int, count: int) -> list[int]:
    """`--seed S --seeds K`: the seeds S, S+1, ..., S+K-1."""
    if count < 1:
        raise ValueError(f"--seeds (how many seeds) must be >= 1, got {count}")
    return list(range(first, first + count))


@dataclass(frozen=True)
class Spread:
    """One figure over several seeds: mean and min–max."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else math.nan

    def fmt(self, digits: int = 2) -> str:
        """`4.10 (3.90–4.30)`; one seed or no spread: `4.10`."""
        if len(self.values) < 2 or self.lo == self.hi:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"

    def row(self) -> dict[str, Any]:
        return {"mean": self.mean, "min": self.lo, "max": self.hi, "values": list(self.values)}


def spread(values: Sequence[float]) -> Spread:
    return Spread(tuple(float(v) for v in values))


def settings_line(num_requests: int, min_duration_s: float, seeds: Sequence[int], link_gbs: float,
                  max_tokens: str | int = "context") -> str:
    """The header every headline table opens with."""
    s = ",".join(str(x) for x in seeds)
    cap = {"context": "the context limit less the prompt", "trace": "the trace's own length (true lengths leak)"}
    return (f"N >= {num_requests} requests per run, arrivals over >= {min_duration_s:g} s (more requests where the "
            f"rate needs them), seeds {s} ({len(seeds)}; figures are mean (min–max) over them), "
            f"KV link {link_gbs:g} GB/s per GPU, clients' max_tokens {cap.get(str(max_tokens), max_tokens)}")


def settings_row(num_requests: int, min_duration_s: float, seeds: Sequence[int], link_gbs: float,
                 max_tokens: str | int = "context") -> dict[str, Any]:
    return {"num_requests_min": num_requests, "min_duration_s": min_duration_s, "seeds": list(seeds),
            "link_gbs": link_gbs, "max_tokens": max_tokens}

"""The `ecoserve` policy's knobs (DESIGN §4.1); `make_policy("ecoserve", **options)` builds one."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ecoserve.latency.cost import CostModel
from ecoserve.predictor.buckets import BucketScheme

PREEMPT_MODES = ("auto", "swap", "recompute")


@dataclass(frozen=True)
class EcoServeConfig:
    predictor: str = "histogram"
    predictor_options: dict[str, Any] = field(default_factory=dict)  # e.g. quantile, path (learned)
    buckets: BucketScheme = field(default_factory=BucketScheme)
    margin: float = 0.05  # share of each decode pool the timeline keeps free
    start_delay: int = 32  # decode steps a reserved cohort may take to start (widened as observed)
    queue_factor: float = 2.0  # prompt tokens queued per prefill worker, in token budgets
    max_cohort: int = 64
    extend_ahead: int = 4  # tokens before the reservation ends at which to extend it
    max_victims: int = 4  # preemptions one extension may cause per round
    preempt_mode: str = "auto"  # "auto" (cost model), or force "swap" / "recompute"
    slo_tpot_ms: float | None = None  # for the TPOT cap when a request brings none
    costs: CostModel = field(default_factory=CostModel)
    pipelining: bool = True
    rl_buckets: bool = True
    ordering: bool = True
    exact_allocation: bool = True
    # Mixed workers: each step's prompt tokens are the most the worker's latency profile predicts
    # within the TPOT SLO less `tpot_margin` (the "slo" schedule); off, the fixed chunked budget.
    slo_budget: bool = True
    tpot_margin: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # --policy-option values arrive as JSON or strings
            _check_type(f, getattr(self, f.name))
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not 0 <= self.tpot_margin < 1:
            raise ValueError(f"tpot_margin must be in [0, 1), got {self.tpot_margin}")
        if self.start_delay < 0:
            raise ValueError(f"start_delay must be >= 0 decode steps, got {self.start_delay}")
        if self.queue_factor <= 0:
            raise ValueError(f"queue_factor must be > 0, got {self.queue_factor}")
        if self.max_cohort < 1 or self.max_victims < 1 or self.extend_ahead < 0:
            raise ValueError(
                f"need max_cohort >= 1, max_victims >= 1, extend_ahead >= 0; got {self.max_cohort}, "
                f"{self.max_victims}, {self.extend_ahead}"
            )
        if self.preempt_mode not in PREEMPT_MODES:
            raise ValueError(f"preempt_mode must be one of {PREEMPT_MODES}, got {self.preempt_mode!r}")


# What each annotation admits, and how a message names it. bool is an int to Python: refused
# where a number is asked for, and a number is refused where true or false is.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "float": ((int, float), "a number"),
    "int": ((int,), "an integer"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
    "dict[str, Any]": ((dict,), "a JSON object"),
    "BucketScheme": ((BucketScheme,), "a list of increasing bucket bounds, e.g. [32,64,128]"),
    "CostModel": ((CostModel,), "a JSON object of cost-model knobs"),
}


def _check_type(f: dataclasses.Field[Any], value: Any) -> None:
    annotation = str(f.type)
    optional = annotation.endswith(" | None")
    types, what = _KINDS[annotation.removesuffix(" | None")]
    if optional and value is None:
        return
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        return
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = f" (default {json.dumps(default)})" if default is not None else ""
    raise ValueError(f"ecoserve option {f.name} must be {what}{' or null' if optional else ''}{shown}, got {value!r}")

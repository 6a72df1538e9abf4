"""Scheduling policies by name: `make_policy("ecoserve", predictor="histogram", margin=0.1)`,
`make_policy("vllm", mode="prefill-priority")`."""

from __future__ import annotations

import dataclasses
from typing import Any

from ecoserve.coordinator.policies.colocated import OrcaPolicy, VLLMPolicy
from ecoserve.coordinator.policies.distserve import DistServePolicy
from ecoserve.coordinator.policies.ecoserve import EcoServeConfig, EcoServePolicy
from ecoserve.coordinator.policy import Policy
from ecoserve.latency.cost import CostModel
from ecoserve.predictor.buckets import BucketScheme

POLICIES: dict[str, Any] = {
    "ecoserve": EcoServePolicy, "distserve": DistServePolicy, "vllm": VLLMPolicy, "orca": OrcaPolicy,
}


# The baselines' knobs: vllm's `mode` is "chunked" (default) or "prefill-priority" (VLLM_MODES).
BASELINE_OPTIONS: dict[str, tuple[str, ...]] = {"vllm": ("mode",)}


def make_policy(name: str, **options: Any) -> Policy:
    """Build a policy; `options` are its knobs (`vllm`: `mode`; for `ecoserve`, EcoServeConfig's fields, with
    `buckets` as a list of bounds and `costs` as a `CostModel`, or as the dict of its CLI knobs,
    `CostModel.from_options`). Unknown names and knobs raise ValueError saying what is allowed."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name != "ecoserve":
        takes = BASELINE_OPTIONS.get(name, ())
        unknown = sorted(set(options) - set(takes))
        if unknown:
            what = f"it takes {', '.join(takes)}" if takes else "it takes no options"
            raise ValueError(f"policy {name!r}: unknown option(s) {unknown}; {what} (predictors and ablation "
                             "switches apply to --policy ecoserve)")
        return POLICIES[name](**options)  # type: ignore[no-any-return]
    allowed = {f.name for f in dataclasses.fields(EcoServeConfig)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown ecoserve option(s) {unknown}; allowed: {sorted(allowed)}")
    opts = dict(options)
    if isinstance(opts.get("buckets"), (list, tuple)):
        opts["buckets"] = BucketScheme(bounds=tuple(opts["buckets"]))
    if isinstance(opts.get("costs"), dict):
        opts["costs"] = CostModel.from_options(opts["costs"])
    return EcoServePolicy(EcoServeConfig(**opts))

"""Scheduling policies by name: `make_policy("ecoserve", predictor="histogram", margin=0.1)`."""

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


def make_policy(name: str, **options: Any) -> Policy:
    """Build a policy; `options` are its knobs (for `ecoserve`, EcoServeConfig's fields, with
    `buckets` as a list of bounds and `costs` as a `CostModel`, or as the dict of its CLI knobs,
    `CostModel.from_options`). Unknown names and knobs raise ValueError saying what is allowed."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name != "ecoserve":
        if options:
            raise ValueError(f"policy {name!r} takes no options (got {sorted(options)}); predictors and "
                             "ablation switches apply to --policy ecoserve")
        return POLICIES[name]()  # type: ignore[no-any-return]
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

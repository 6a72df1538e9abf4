"""Scheduling policies by name: `make_policy("distserve")`."""

from __future__ import annotations

from ecoserve.coordinator.policies.colocated import OrcaPolicy, VLLMPolicy
from ecoserve.coordinator.policies.distserve import DistServePolicy
from ecoserve.coordinator.policy import Policy

POLICIES: dict[str, type[DistServePolicy] | type[VLLMPolicy]] = {
    "distserve": DistServePolicy, "vllm": VLLMPolicy, "orca": OrcaPolicy,
}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()

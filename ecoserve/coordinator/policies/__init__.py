"""Scheduling policies by name: `make_policy("distserve")`."""

from __future__ import annotations

from ecoserve.coordinator.policies.distserve import DistServePolicy
from ecoserve.coordinator.policy import Policy

POLICIES = {"distserve": DistServePolicy}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()

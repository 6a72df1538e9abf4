"""The `ecoserve` policy (DESIGN §4.1): the policy (policy.py), its knobs (config.py), its RL-bucket
queues (queues.py) and its per-round working state (round.py)."""

from ecoserve.coordinator.policies.ecoserve.config import PREEMPT_MODES, EcoServeConfig
from ecoserve.coordinator.policies.ecoserve.policy import EcoServePolicy
from ecoserve.coordinator.policies.ecoserve.queues import BucketQueues

__all__ = ["PREEMPT_MODES", "BucketQueues", "EcoServeConfig", "EcoServePolicy"]

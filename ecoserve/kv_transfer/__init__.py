"""KV block transfer between prefill and decode ranks over torch.distributed P2P; control over ZeroMQ.

The coordinator half (``planner``, ``types``) is torch-free and exported here; workers import
``ecoserve.kv_transfer.engine`` (``KVTransferWorker``) and ``ecoserve.kv_transfer.backend``
directly, which pull in torch.
"""

from ecoserve.kv_transfer.planner import TransferPlanner
from ecoserve.kv_transfer.types import (
    CompatRecord,
    IncompatibleWorkerError,
    TransferPlan,
    TransferState,
    TransferUpdate,
)

__all__ = [
    "CompatRecord",
    "IncompatibleWorkerError",
    "TransferPlan",
    "TransferPlanner",
    "TransferState",
    "TransferUpdate",
]

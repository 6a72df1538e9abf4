"""Paged KV attention and movement kernels (Triton on GPU; C on CPU, in cpu.py), each beside a pure-torch reference and a checked wrapper."""

from __future__ import annotations

# ops imports only torch and the references; triton is imported on first use of backend="triton"
from ecoserve.kernels.ops import (
    Backend,
    gather_blocks,
    paged_decode_attention,
    scatter_blocks,
    triton_available,
    write_kv,
)

__all__ = [
    "Backend",
    "gather_blocks",
    "paged_decode_attention",
    "scatter_blocks",
    "triton_available",
    "write_kv",
]

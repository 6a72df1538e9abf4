"""Memory-bandwidth floor for a decode step: every weight byte must be read once per step."""

from __future__ import annotations

import time

import torch
from torch import nn


def copy_bandwidth_gbs(size_mib: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-`repeats` copy bandwidth in GB/s, counting bytes read plus bytes written (STREAM's
    convention for its Copy kernel). The buffer is far larger than any CPU cache."""
    src = torch.empty(size_mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def weight_bytes_per_decode_step(model: nn.Module) -> int:
    """Bytes of weights a decode step reads. The embedding table is read in full only when it is
    also the (tied) output head; a lookup alone reads a few rows, so an untied one is excluded."""
    total = 0
    embed = getattr(model, "embed_tokens", None)
    tied = getattr(model, "lm_head", None) is None
    for name, p in model.named_parameters():
        if embed is not None and p is embed.weight and not tied:
            continue
        total += p.numel() * p.element_size()
    return total

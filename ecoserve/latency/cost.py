"""The cost model scheduling policies use: a latency profile's step times, plus KV swap costs.

The step-time formulas are the profile's own (`LatencyProfile.prefill_ms`, `.decode_ms`); this
module only says which profile a policy reads and adds what a profile does not know: moving KV
to host memory and back. No torch here: the coordinator uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ecoserve.latency.profile import LatencyProfile

# `--policy-option costs={...}`: the cost model's knobs as the CLI and JSON settings give them.
COST_OPTIONS = ("decode", "prefill", "kv_bytes_per_token", "swap_bytes_per_s")
_CPU_PREFILL = (10.0, 0.5, 0.0)  # a CPU-scale recompute cost for a ~100M model, when none is given
_NO_FIT = (0.0, 0.0, 0.0)


def _fits(name: str, prefill: tuple[float, float, float], decode: tuple[float, float, float]) -> LatencyProfile:
    # One decode fit at every batch size, summed context: the form a policy's cap reads.
    return LatencyProfile(name, prefill, decode, decode, 1)


@dataclass(frozen=True)
class CostModel:
    """What a policy asks of latency: the decode step time (its TPOT cap) and swap versus recompute.

    recompute ms = the profile's prefill step for L tokens; swap ms = 2 * L * kv_bytes_per_token /
    swap_bytes_per_s (out, then in), with the worker's own KV bytes per token when it reported its
    model at registration. Without a decode fit (`has_decode_fit` False) there is no TPOT cap.
    """

    profile: LatencyProfile = field(default_factory=lambda: _fits("cpu-default", _CPU_PREFILL, _NO_FIT))
    has_decode_fit: bool = False
    kv_bytes_per_token: float = 64 * 1024
    swap_bytes_per_s: float = 8e9

    @classmethod
    def from_profile(cls, profile: LatencyProfile, kv_bytes_per_token: float, swap_bytes_per_s: float) -> CostModel:
        """The cost model of workers with `profile`. Its TPOT cap reads the small-batch decode fit at
        every batch size, in the summed-context form, as it always has (the large-batch fit is not
        used; changing that changes which cohorts are admitted)."""
        capped = dataclasses.replace(profile, decode_large=profile.decode_small, decode_context="sum")
        return cls(capped, True, kv_bytes_per_token, swap_bytes_per_s)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> CostModel:
        """From `--policy-option costs={...}`: `decode` and `prefill` as [a, b, c] in the profile's
        forms, `kv_bytes_per_token`, `swap_bytes_per_s`; each optional. ValueError names the keys."""
        bad = sorted(set(options) - set(COST_OPTIONS))
        if bad:
            raise ValueError(f"unknown cost model field(s) {bad}; allowed: {', '.join(COST_OPTIONS)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        decode = values.get("decode")
        default = cls()
        return cls(
            _fits("costs", values.get("prefill", _CPU_PREFILL), decode if decode is not None else _NO_FIT),
            decode is not None,
            values.get("kv_bytes_per_token", default.kv_bytes_per_token),
            values.get("swap_bytes_per_s", default.swap_bytes_per_s),
        )

    def decode_ms(self, batch: int, context_tokens: float) -> float:
        """One decode step of `batch` requests holding `context_tokens` in all; 0 without a fit."""
        if not self.has_decode_fit:
            return 0.0
        return self.profile.decode_ms(batch, context_tokens)

    def recompute_ms(self, tokens: int) -> float:
        """Prefilling `tokens` again (a preempted request's prompt and outputs so far)."""
        return self.profile.prefill_ms(tokens, tokens * tokens)

    def swap_ms(self, tokens: int, kv_bytes_per_token: float | None = None) -> float:
        per_token = kv_bytes_per_token or self.kv_bytes_per_token
        return 2e3 * tokens * per_token / self.swap_bytes_per_s

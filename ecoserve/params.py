"""What a request asks for: sampling parameters (the vLLM names users already know) and latency
targets, both validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt.

    temperature 0 means greedy; `top_k=-1` and `top_p=1.0` disable those filters. With `seed`
    set, sampling for the request is reproducible whatever it is batched with.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stop = tuple(self.stop_token_ids)
        # C-speed first (a decoded frame may carry millions of ids), the exact rule if that fails.
        exact = not stop or (set(map(type, stop)) == {int} and min(stop) >= 0)
        if not exact and any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stop):
            shown = f"{list(stop)!r}" if len(stop) <= 16 else f"{list(stop[:16])!r}... ({len(stop)} ids)"
            raise ValueError(f"stop_token_ids must be non-negative integers, got {shown}")
        object.__setattr__(self, "stop_token_ids", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SLO:
    """Latency targets of one request (or of a whole run) in milliseconds; None leaves a target
    unset, and an unset target is always met."""

    ttft_ms: float | None = None  # time to first token
    tpot_ms: float | None = None  # time per output token after the first

    def __post_init__(self) -> None:
        for name, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"SLO.{name}: the {label} SLO must be a number of milliseconds > 0 (finite), or None to leave "
                    f"it unset; got {value!r}"
                )

    def met_by(self, ttft_ms: float, tpot_ms: float) -> bool:
        """Whether a request with these latencies meets both targets (an unset one always holds)."""
        return (self.ttft_ms is None or ttft_ms <= self.ttft_ms) and (self.tpot_ms is None or tpot_ms <= self.tpot_ms)

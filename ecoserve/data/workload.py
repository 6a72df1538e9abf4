"""The request record every workload loader returns, and small checks the loaders share."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol, Sequence

# DistServe's and vLLM's ShareGPT benchmarks drop prompts shorter than this: a prompt of one or
# two tokens measures the fixed per-request cost, not prefill.
MIN_PROMPT_LEN = 4


@dataclass(frozen=True)
class WorkloadRequest:
    """One request to replay: when it arrives and how many tokens go in and come out."""

    arrival_s: float  # seconds since the first request of the workload
    prompt_len: int  # prompt tokens
    output_len: int  # tokens to generate (forced: ignore EOS when replaying)
    prompt: str | None = None  # prompt text when the source has text (Azure traces do not)

    def __post_init__(self) -> None:
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(
                f"arrival_s must be a finite number >= 0 seconds, got {self.arrival_s!r}"
            )
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1 token, got {self.prompt_len}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1 token, got {self.output_len}")

    @property
    def total_len(self) -> int:
        """Tokens the request holds in the KV cache when it finishes."""
        return self.prompt_len + self.output_len


class TokenEncoder(Protocol):
    """Anything that turns text into token ids, e.g. a Hugging Face tokenizer."""

    def encode(self, text: str) -> list[int]: ...


def token_len(tokenizer: TokenEncoder, text: str) -> int:
    """Number of tokens `tokenizer` produces for `text` (special tokens as it adds them)."""
    return len(tokenizer.encode(text))


def is_int(value: object) -> bool:
    """True for Python and numpy integers; False for bools, which are ints only by accident."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_limit(limit: int | None) -> None:
    """`limit` caps how many items a loader returns; None means all of them."""
    if limit is not None and (not is_int(limit) or limit < 0):
        raise ValueError(f"limit must be None (no cap) or an integer >= 0, got {limit!r}")


def check_count(name: str, value: int) -> None:
    """A request count must be a positive integer."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_optional_len(name: str, value: int | None) -> None:
    """An optional token-length limit must be None (no limit) or a positive integer."""
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"{name} must be None (no limit) or an integer >= 1, got {value!r}")


def fits(
    prompt_len: int,
    output_len: int,
    max_prompt_len: int | None,
    max_total_len: int | None,
    min_output_len: int,
) -> bool:
    """Whether a (prompt, output) pair passes the usual benchmark length filters."""
    if prompt_len < MIN_PROMPT_LEN or output_len < min_output_len:
        return False
    if max_prompt_len is not None and prompt_len > max_prompt_len:
        return False
    return max_total_len is None or prompt_len + output_len <= max_total_len


def arrival_span_s(requests: Sequence[WorkloadRequest]) -> float:
    """Seconds from the first arrival to the last; 0 for fewer than two requests."""
    if len(requests) < 2:
        return 0.0
    return requests[-1].arrival_s - requests[0].arrival_s

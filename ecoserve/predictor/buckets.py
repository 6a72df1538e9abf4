"""Response-length buckets (DESIGN §4.1): a predicted length is rounded up to a bucket bound
and clipped to the request's `max_tokens`. Default: width 32 up to 512, then doubling."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BucketScheme:
    """Bucket upper bounds: `width`, 2*width, ..., `linear_until`, then doubling up to `limit`.

    `bounds` may be given instead; it must be strictly increasing positive integers.
    """

    width: int = 32
    linear_until: int = 512
    limit: int = 1 << 20
    bounds: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.bounds:
            b = tuple(self.bounds)
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b):
                raise ValueError(f"bucket bounds must be positive integers, got {list(b)}")
            if any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"bucket bounds must be strictly increasing, got {list(b)}")
            object.__setattr__(self, "bounds", b)
            return
        if self.width < 1:
            raise ValueError(f"bucket width must be >= 1, got {self.width}")
        if self.linear_until < self.width or self.linear_until % self.width:
            raise ValueError(
                f"linear_until must be a multiple of width ({self.width}) and >= it, got {self.linear_until}"
            )
        bounds = list(range(self.width, self.linear_until + 1, self.width))
        while bounds[-1] < self.limit:
            bounds.append(bounds[-1] * 2)
        object.__setattr__(self, "bounds", tuple(bounds))

    def bucket(self, length: int, max_tokens: int) -> int:
        """The bound of the bucket holding `length`, clipped to `max_tokens` (both >= 1)."""
        if length < 1 or max_tokens < 1:
            raise ValueError(f"length and max_tokens must be >= 1, got {length} and {max_tokens}")
        i = bisect.bisect_left(self.bounds, length)
        bound = self.bounds[i] if i < len(self.bounds) else length
        return min(bound, max_tokens)

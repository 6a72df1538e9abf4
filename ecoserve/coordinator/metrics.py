"""Small, dependency-free metric helpers for the coordinator's own costs."""

from __future__ import annotations

import random


class Reservoir:
    """Uniform sample of at most `size` values (reservoir sampling) with percentile summaries."""

    def __init__(self, size: int = 20_000, seed: int = 0) -> None:
        self.size = size
        self.count = 0
        self.values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.count)
            if j < self.size:
                self.values[j] = value

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile, q in [0, 100]; 0.0 when empty."""
        if not self.values:
            return 0.0
        ordered = sorted(self.values)
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]

    def summary(self, name: str) -> dict[str, float]:
        return {
            f"{name}.count": float(self.count),
            f"{name}.p50": self.percentile(50),
            f"{name}.p99": self.percentile(99),
            f"{name}.max": max(self.values, default=0.0),
        }

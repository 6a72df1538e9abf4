"""The coordinator's metrics: its gauges and counters (`coordinator_stats`), a finished request's
timing split (`request_timings`), and a reservoir for its own costs. Dependency-free."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ecoserve.coordinator.request import Request, RequestStatus as S

if TYPE_CHECKING:
    from ecoserve.coordinator.lifecycle import Lifecycle


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


def coordinator_stats(lc: Lifecycle) -> dict[str, float]:
    """The coordinator's gauges and counters (the server's /metrics), flat names to floats."""
    views = lc.registry.views.values()
    by_status: dict[str, float] = {s.value: 0.0 for s in S if not s.terminal}
    for req in lc.requests.values():
        by_status[req.status.value] += 1
    values = {
        "requests_in_flight": float(len(lc.requests)),
        "queue_waiting_prefill": float(len(lc.waiting)),
        "queue_retry_backoff": float(len(lc.backoff)),
        "queue_kv_waiting": float(len(lc.kv_waiting)),
        "requests_releasing": float(len(lc.releasing)),
        "reserved_blocks": float(
            sum(max(0, v.committed_blocks) + v.reserved_blocks for v in views)
            + sum(led.reserved_blocks for led in lc.ledger.ranks.values())
        ),
        "transfers_in_flight": float(len(lc.transfer_blocks)),
        "workers_alive": float(sum(v.alive for v in views)),
        "queue_near_limit": float(len(lc.near_limit)),
        "queue_preempted": float(len(lc.preempted)),
    }
    for rank, silence in lc.registry.silences.items():  # ranks lost for missing heartbeats
        values[f"lost.{rank}.silent_s"] = silence.silent_s
        values[f"lost.{rank}.silent_at_previous_check_s"] = silence.silent_at_previous_check_s
    done = lc.counters["predicted"]
    values["prediction_mean_abs_error"] = lc.prediction_abs_error / done if done else 0.0
    values.update({f"queue_bucket.{b}": float(n) for b, n in lc.waiting.lengths().items()})
    for v in views:  # per worker: decode-side reservations, physical use, and what pipelining lends
        led = lc.ledger.ranks.get(v.rank)
        reserved = led.reserved_blocks if led else 0
        values[f"worker.{v.rank}.reserved_blocks"] = float(reserved + v.reserved_blocks)
        values[f"worker.{v.rank}.used_blocks"] = float(v.num_blocks - v.free_blocks)
        # Reservations beyond the physical pool: space promised to guests out of hosts' future growth.
        values[f"worker.{v.rank}.lent_blocks"] = float(max(0, reserved - v.num_blocks))
    values.update({f"status.{k}": v for k, v in by_status.items()})
    values.update({k: float(v) for k, v in lc.counters.items()})
    values.update(lc.dispatch_ms.summary("dispatch_ms"))
    values.update(lc.schedule_us.summary("schedule_call_us"))
    return values


def request_timings(req: Request) -> dict[str, float]:
    """The timing split of a finished request (RequestFinished's fields), in ms."""
    # `is None`, not falsiness: a simulated clock starts at 0.0, a time like any other.
    end = req.events[-1].time
    first_token = _first(req.first_time(S.TRANSFERRING), req.first_time(S.DECODING), end)
    prefilling = req.first_time(S.PREFILLING)
    decoding = req.first_time(S.DECODING)
    n = len(req.output_token_ids)
    ms = 1e3
    return dict(
        ttft_ms=(first_token - req.arrival) * ms if n else 0.0,
        tpot_ms=(end - first_token) * ms / (n - 1) if n > 1 else 0.0,
        e2e_ms=(end - req.arrival) * ms,
        queue_ms=(_first(prefilling, end) - req.arrival) * ms,
        prefill_ms=(first_token - prefilling) * ms if prefilling is not None and n else 0.0,
        transfer_ms=(decoding - first_token) * ms if decoding is not None else 0.0,
    )


def _first(*times: float | None) -> float:
    return next(t for t in times if t is not None)

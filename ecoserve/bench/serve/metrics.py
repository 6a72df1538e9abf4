"""What `ecoserve bench serve` measured, and the metrics of DESIGN §8 computed from it.

Latencies are measured at the client, from a request's scheduled arrival (so any lag of the
sender counts against the server, as a user would feel it):

- TTFT: arrival -> first token received; E2E: arrival -> last token received;
- TPOT: (last token - first token) / (output tokens - 1), per request;
- ITL: each gap between received tokens; a delta carrying k tokens counts as k gaps of
  1/k of its wait each (tokens the server sent together arrived together);
- SLO attainment: share of all sent requests (failed and lost ones count as misses) whose TTFT
  and TPOT both meet their targets; an unset target, or the TPOT of a one-token output, is met;
- goodput: requests per second that met both SLOs, over the run's duration (first arrival to
  last request's end). DESIGN §7's goodput, the highest rate with >= 90% attainment, is found
  by running this benchmark at several rates;
- KVC utilisation: used and reserved KV blocks as shares of every worker's pool, sampled from
  the server's stats about every 0.5 s; preemptions, prediction error and failures are the
  change of the server's counters over the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ecoserve.client.types import SLO, ServerInfo

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestResult:
    """One request as the benchmark saw it. Times are seconds since the benchmark's start."""

    index: int
    arrival_s: float  # scheduled arrival
    send_lag_ms: float  # how late the sender was on the schedule
    prompt_len: int  # prompt tokens (the server's count for text prompts, once finished)
    output_len: int  # forced output length (max_tokens with ignore_eos)
    status: str  # "ok", "failed" (an error came back) or "lost" (nothing ended it in time)
    end_s: float  # when its terminal event, error or timeout came
    token_times: list[float] = field(default_factory=list)  # receipt time of every output token
    finish_reason: str | None = None
    error: str | None = None
    server_ttft_ms: float | None = None  # the coordinator's own timings (Completion)
    server_tpot_ms: float | None = None
    server_e2e_ms: float | None = None
    server_queue_ms: float | None = None  # the coordinator's split: queued, prefilling, first token -> decoding
    server_prefill_ms: float | None = None
    server_transfer_ms: float | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft_ms(self) -> float | None:
        return (self.token_times[0] - self.arrival_s) * 1e3 if self.token_times else None

    @property
    def e2e_ms(self) -> float | None:
        return (self.token_times[-1] - self.arrival_s) * 1e3 if self.token_times else None

    @property
    def tpot_ms(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) * 1e3 / (n - 1) if n > 1 else None

    @property
    def itl_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.token_times, self.token_times[1:])]

    def meets(self, slo: SLO) -> bool:
        """Finished with every token, within both targets."""
        if self.status != "ok" or self.num_output_tokens != self.output_len:
            return False
        ttft, tpot = self.ttft_ms, self.tpot_ms
        ok_ttft = slo.ttft_ms is None or (ttft is not None and ttft <= slo.ttft_ms)
        return ok_ttft and (slo.tpot_ms is None or tpot is None or tpot <= slo.tpot_ms)


@dataclass(frozen=True)
class KVSample:
    """The server's KV cache at one moment; blocks summed over every worker."""

    t_s: float
    used_blocks: float
    reserved_blocks: float
    capacity_blocks: float
    requests_in_flight: float


@dataclass(frozen=True)
class BenchResult:
    requests: list[RequestResult]
    duration_s: float  # first arrival -> the last request's end
    slo: SLO
    server: ServerInfo
    kv_samples: list[KVSample]
    stats_before: dict[str, float]
    stats_after: dict[str, float]  # empty when the server could not be asked at the end
    clipped_prompts: int = 0  # what fitting the workload to the server changed (Workload)
    clipped_outputs: int = 0
    dropped: int = 0


def kv_sample(t_s: float, stats: dict[str, float]) -> KVSample:
    capacity = sum(v for k, v in stats.items() if k.startswith("rank") and k.endswith(".num_blocks"))
    return KVSample(
        t_s, stats.get("kv_used_blocks", 0.0), stats.get("reserved_blocks", 0.0), capacity,
        stats.get("requests_in_flight", 0.0),
    )


def summarize(result: BenchResult) -> dict[str, Any]:
    """The flat summary: every figure of the report, None where nothing was measured."""
    reqs = result.requests
    ok = [r for r in reqs if r.status == "ok"]
    dur = result.duration_s
    out_tokens = sum(r.num_output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    met = sum(r.meets(result.slo) for r in reqs)
    s: dict[str, Any] = {
        "num_requests": len(reqs),
        "completed": len(ok),
        "failed": sum(r.status == "failed" for r in reqs),
        "lost": sum(r.status == "lost" for r in reqs),
        "output_len_mismatches": sum(r.num_output_tokens != r.output_len for r in ok),
        "clipped_prompts": result.clipped_prompts,
        "clipped_outputs": result.clipped_outputs,
        "dropped": result.dropped,
        "duration_s": dur,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": _rate(len(ok), dur),
        "output_throughput": _rate(out_tokens, dur),
        "total_token_throughput": _rate(in_tokens + out_tokens, dur),
    }
    for name, values in (
        ("ttft", [r.ttft_ms for r in ok]), ("tpot", [r.tpot_ms for r in ok]),
        ("itl", [g for r in ok for g in r.itl_ms]), ("e2e", [r.e2e_ms for r in ok]),
    ):
        s |= _distribution(name, [v for v in values if v is not None])
    s |= {
        "slo_ttft_ms": result.slo.ttft_ms,
        "slo_tpot_ms": result.slo.tpot_ms,
        "slo_met": met,
        "slo_attainment": met / len(reqs) if reqs else None,
        "goodput_req_s": _rate(met, dur),
        "send_lag_p99_ms": _percentile([r.send_lag_ms for r in reqs], 99),
    }
    return s | _kv_summary(result.kv_samples) | _server_summary(result.stats_before, result.stats_after)


def _distribution(name: str, values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"{name}_mean_ms": float(np.mean(values)) if values else None}
    for q in PERCENTILES:
        out[f"{name}_p{q}_ms"] = _percentile(values, q)
    return out


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _rate(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def _kv_summary(samples: Sequence[KVSample]) -> dict[str, float | None]:
    with_pool = [s for s in samples if s.capacity_blocks > 0]
    used = [s.used_blocks / s.capacity_blocks for s in with_pool]
    reserved = [s.reserved_blocks / s.capacity_blocks for s in with_pool]
    return {
        "kv_samples": len(with_pool),
        "kv_capacity_blocks": with_pool[-1].capacity_blocks if with_pool else None,
        "kv_used_mean": float(np.mean(used)) if used else None,
        "kv_used_peak": max(used, default=None),
        "kv_used_peak_blocks": max((s.used_blocks for s in with_pool), default=None),
        "kv_reserved_mean": float(np.mean(reserved)) if reserved else None,
        "kv_reserved_peak": max(reserved, default=None),
    }


def _server_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    def delta(key: str) -> float | None:
        return after[key] - before.get(key, 0.0) if key in after else None

    predicted = delta("predicted") or 0.0
    error_sum = (
        after.get("prediction_mean_abs_error", 0.0) * after.get("predicted", 0.0)
        - before.get("prediction_mean_abs_error", 0.0) * before.get("predicted", 0.0)
    )
    return {
        "preemptions": delta("preemptions"),
        "preemptions_swap": delta("preemptions_swap"),
        "preemptions_recompute": delta("preemptions_recompute"),
        "server_failed": delta("failed"),
        "predicted": predicted,
        "prediction_mean_abs_error": error_sum / predicted if predicted else None,
        "under_predicted": delta("under_predicted"),
        "schedule_call_p50_us": after.get("schedule_call_us.p50"),
        "schedule_call_p99_us": after.get("schedule_call_us.p99"),
        "dispatch_p50_ms": after.get("dispatch_ms.p50"),
        "dispatch_p99_ms": after.get("dispatch_ms.p99"),
    }

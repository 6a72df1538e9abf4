"""`ecoserve bench serve`'s output: the table (laid out like vLLM's benchmark_serving), the
JSON document and the latency CDF plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from ecoserve.report import write_json
from ecoserve.bench.serve.metrics import PERCENTILES, BenchResult, summarize

WIDTH = 60


def print_report(
    result: BenchResult, title: str = "Serving Benchmark Result", write: Callable[[str], None] = print
) -> None:
    """The summary as sections of `label: value` lines."""
    for line in report_lines(summarize(result), title):
        write(line)


def report_lines(s: dict[str, Any], title: str = "Serving Benchmark Result") -> list[str]:
    lines = [f" {title} ".center(WIDTH, "=")]

    def section(name: str) -> None:
        lines.append(f" {name} ".center(WIDTH, "-"))

    def row(label: str, value: Any, digits: int = 2) -> None:
        text = "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        lines.append(f"{label + ':':<44}{text:>16}")

    section("Requests")
    row("Sent requests", s["num_requests"])
    row("Successful requests", s["completed"])
    row("Failed requests", s["failed"])
    row("Lost requests (no end within the timeout)", s["lost"])
    row("Outputs not of the forced length", s["output_len_mismatches"])
    row("Prompts / outputs clipped to the server", f"{s['clipped_prompts']} / {s['clipped_outputs']}")
    row("Text prompts dropped (over the limit)", s["dropped"])
    row("Benchmark duration (s)", s["duration_s"])
    row("Total input tokens", s["total_input_tokens"])
    row("Total generated tokens", s["total_output_tokens"])
    section("Throughput")
    row("Request throughput (req/s)", s["request_throughput"], 3)
    row("Output token throughput (tok/s)", s["output_throughput"])
    row("Total token throughput (tok/s)", s["total_token_throughput"])
    for key, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                      ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
        section(name)
        row(f"Mean {key.upper()} (ms)", s[f"{key}_mean_ms"])
        for q in PERCENTILES:
            row(f"P{q} {key.upper()} (ms)", s[f"{key}_p{q}_ms"])
    section("SLO")
    row("TTFT SLO (ms)", s["slo_ttft_ms"] if s["slo_ttft_ms"] is not None else "none")
    row("TPOT SLO (ms)", s["slo_tpot_ms"] if s["slo_tpot_ms"] is not None else "none")
    row("Requests meeting both", s["slo_met"])
    row("SLO attainment", s["slo_attainment"], 3)
    row("Goodput (req/s meeting both SLOs)", s["goodput_req_s"], 3)
    section("Server")
    row("KV capacity (blocks, all workers)", _int(s["kv_capacity_blocks"]))
    row("KV used, mean / peak (% of capacity)", _pair(_pct(s["kv_used_mean"]), _pct(s["kv_used_peak"]), 2))
    row("KV reserved, mean / peak (% of capacity)", _pair(_pct(s["kv_reserved_mean"]), _pct(s["kv_reserved_peak"]), 2))
    row("Preemptions", _int(s["preemptions"]))
    row("Length prediction mean abs error (tok)", s["prediction_mean_abs_error"], 1)
    row("Schedule call p50 / p99 (us)", _pair(s["schedule_call_p50_us"], s["schedule_call_p99_us"], 1))
    row("Dispatch p50 / p99 (ms)", _pair(s["dispatch_p50_ms"], s["dispatch_p99_ms"]))
    row("Sender lag p99 (ms)", s["send_lag_p99_ms"])
    lines.append("=" * WIDTH)
    return lines


def _pair(a: float | None, b: float | None, digits: int = 3) -> str:
    return "n/a" if a is None or b is None else f"{a:.{digits}f} / {b:.{digits}f}"


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _int(value: float | None) -> str:
    return "n/a" if value is None else str(int(value))


def write_result(path: str | Path, result: BenchResult, settings: dict[str, Any], **details: Any) -> None:
    """{summary, machine, settings, server, errors, requests, kv_timeline, stats_before/after}."""
    errors = [
        {"index": r.index, "status": r.status, "error": r.error} for r in result.requests if r.status != "ok"
    ]
    requests = [
        {k: v for k, v in asdict(r).items() if k != "token_times"}
        | {"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "e2e_ms": r.e2e_ms, "num_output_tokens": r.num_output_tokens}
        for r in result.requests
    ]
    write_json(
        path, summarize(result), settings, server=asdict(result.server), errors=errors, requests=requests,
        kv_timeline=[asdict(k) for k in result.kv_samples], stats_before=result.stats_before,
        stats_after=result.stats_after, **details,
    )


def plot_cdfs(result: BenchResult, path: str | Path) -> None:
    """A PNG with the empirical CDFs of TTFT, TPOT and E2E, the SLO targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    ok = [r for r in result.requests if r.status == "ok"]
    panels = [
        ("TTFT", [r.ttft_ms for r in ok], result.slo.ttft_ms),
        ("TPOT", [r.tpot_ms for r in ok], result.slo.tpot_ms),
        ("E2E", [r.e2e_ms for r in ok], None),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, raw, target) in zip(axes, panels):
        values = sorted(v for v in raw if v is not None)
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
        if target is not None:
            ax.axvline(target, color="tab:red", linestyle="--", label=f"SLO {target:g} ms")
            ax.legend(loc="lower right")
        ax.set(title=f"{name} ({len(values)} requests)", xlabel=f"{name} (ms)", ylabel="share of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.server.model_id}: latency CDFs, {len(result.requests)} requests")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

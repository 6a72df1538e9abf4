"""Head-to-head comparisons on the simulator: `ecoserve sim`, `bench compare-distserve`,
`bench compare-vllm`. Each prints a table and writes JSON (and PNG plots for the comparisons).

- compare-distserve: for a target rate, the fewest GPUs each policy needs to keep SLO
  attainment >= 90% (`experiment.min_gpus`), then attainment against rate for each policy's
  chosen layout. The paper's claim: up to 78% fewer GPUs than DistServe.
- compare-vllm: on the same number of GPUs, each policy's best layout: goodput (throughput at
  equal latency, i.e. the highest rate meeting the SLOs), then JCT and attainment at a common
  rate sweep. The paper's claims: up to 4x throughput, 91% lower JCT, 91% higher attainment.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from ecoserve.config import ClusterShape
from ecoserve.sim.experiment import (
    COLOCATED, DISAGGREGATED, SLO, Layout, RunMetrics, Search, goodput, layouts, min_gpus, simulate,
)
from ecoserve.sim.workloads import make_workload


def metrics_table(rows: Sequence[RunMetrics]) -> str:
    head = (f"{'policy':<10} {'layout':<22} {'GPUs':>4} {'rate':>7} {'done':>6} {'attain':>7} {'TTFT p50':>9} "
            f"{'TTFT p90':>9} {'TPOT p50':>9} {'TPOT p90':>9} {'JCT mean':>9} {'JCT p90':>9} {'tok/s':>8} "
            f"{'KV used':>7} {'KV resv':>7} {'preempt':>7}")
    lines = [head, "-" * len(head)]
    for m in rows:
        lines.append(
            f"{m.policy:<10} {m.layout:<22} {m.gpus:>4} {m.rate:>7.2f} {m.finished:>6} {m.attainment:>7.3f} "
            f"{m.ttft_ms['p50']:>9.1f} {m.ttft_ms['p90']:>9.1f} {m.tpot_ms['p50']:>9.1f} {m.tpot_ms['p90']:>9.1f} "
            f"{m.jct_ms['mean']:>9.0f} {m.jct_ms['p90']:>9.0f} {m.throughput_tok_s:>8.0f} {m.kvc_used:>7.2f} "
            f"{m.kvc_reserved:>7.2f} {m.preemptions:>7}"
        )
    return "\n".join(lines)


def run_sim(args: Any, options: dict[str, Any]) -> int:
    """`ecoserve sim`: one run, the DESIGN §8 metric table."""
    layout = Layout(args.policy, _sim_shape(args))
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    workload = make_workload(args.workload, args.num_requests, args.rate, args.seed)
    bar = tqdm(total=len(workload), desc=f"sim {args.policy}", unit="req", disable=args.quiet)
    m, res, _ = simulate(layout, args.model, workload, slo, policy_options=options, progress=bar.update)
    bar.close()
    if args.rate is not None:
        m.rate = args.rate
    print(metrics_table([m]))
    print(f"simulated {m.num_requests} requests in {m.wall_s:.2f} s wall ({m.num_requests / max(m.wall_s, 1e-9):,.0f} "
          f"requests/s), {res.events:,} events, {res.schedule_calls:,} scheduling rounds "
          f"(p50 {m.schedule_us_p50:.0f} us, p99 {m.schedule_us_p99:.0f} us)")
    if args.out:
        _write(Path(args.out), {"metrics": m.row(), "counters": res.counters, "events": res.events,
                                "schedule_calls": res.schedule_calls})
        print(f"wrote {args.out}")
    return 0


def _sim_shape(args: Any) -> ClusterShape:
    """The flags' shape. A colocated policy with no --mixed gets 1 mixed instance, a disaggregated
    one missing --prefill or --decode gets at least 1 of each; both then drop the other kind's counts."""
    prefill, decode, mixed = args.prefill or 0, args.decode or 0, args.mixed or 0
    if args.policy in COLOCATED and not mixed:
        return ClusterShape(mixed=1, tp_mixed=args.tp_mixed)
    if args.policy in DISAGGREGATED and not (prefill and decode):
        return ClusterShape(max(1, prefill), args.tp_prefill, max(1, decode), args.tp_decode)
    return ClusterShape(prefill, args.tp_prefill, decode, args.tp_decode, mixed, args.tp_mixed)


def _setup(args: Any, options: dict[str, Any]) -> tuple[Path, Search, list[str]]:
    """The output folder (made), the search both comparisons run, and the policies to compare."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    search = Search(args.profile, args.workload, SLO(args.slo_ttft_ms, args.slo_tpot_ms), args.num_requests,
                    args.min_duration_s, args.seed, policy_options=options)
    return out, search, args.policies.split(",")


def compare_distserve(args: Any, options: dict[str, Any]) -> dict[str, Any]:
    out, search, policies = _setup(args, options)
    best: dict[str, RunMetrics | None] = {}
    chosen: dict[str, Layout | None] = {}
    probes: dict[str, list[dict[str, Any]]] = {}
    for pol in policies:
        bar = tqdm(desc=f"GPU search {pol}", unit="layout", disable=args.quiet)
        lay, m, tried = min_gpus(search, pol, args.rate, args.max_gpus, on_probe=lambda _m: bar.update(1))
        bar.close()
        best[pol], chosen[pol] = m, lay
        probes[pol] = [t.row() for t in tried]
    rows = [m for m in best.values() if m is not None]
    print(f"fewest GPUs for {args.rate} req/s at >= {search.goal:.0%} attainment "
          f"(TTFT <= {args.slo_ttft_ms} ms, TPOT <= {args.slo_tpot_ms} ms), {args.profile}, {args.workload}")
    print(gpu_table(best, args.rate))
    sweeps = _sweeps(search, chosen, args.rate, args.quiet)
    result = {
        "profile": args.profile, "workload": args.workload, "rate": args.rate, "goal": search.goal,
        "slo": asdict(search.slo), "best": {p: (m.row() if m else None) for p, m in best.items()},
        "probes": probes, "sweeps": sweeps, "gpu_saving_vs_distserve": _saving(best),
    }
    _write(out / "compare_distserve.json", result)
    _plot_gpus(best, out / "gpus.png", f"GPUs for {args.rate} req/s ({args.profile}, {args.workload})")
    _plot_sweeps(sweeps, out / "attainment_vs_rate.png", "SLO attainment against rate", "attainment")
    print(f"wrote {out / 'compare_distserve.json'}, {out / 'gpus.png'}, {out / 'attainment_vs_rate.png'}")
    return result


def compare_vllm(args: Any, options: dict[str, Any]) -> dict[str, Any]:
    out, search, policies = _setup(args, options)
    chosen: dict[str, Layout] = {}
    goodputs: dict[str, float] = {}
    for pol in policies:
        cands = [x for x in layouts(pol, args.profile, args.gpus) if x.shape.gpus == args.gpus]
        if not cands:
            raise ValueError(f"no {pol} layout uses exactly {args.gpus} GPUs with the TP degrees of {args.profile}")
        best_g, best_l = -1.0, cands[0]
        bar = tqdm(cands, desc=f"goodput {pol}", unit="layout", disable=args.quiet)
        for lay in bar:
            g, _ = goodput(search, lay, rel_tol=args.rel_tol)
            if g > best_g:
                best_g, best_l = g, lay
        chosen[pol], goodputs[pol] = best_l, best_g
    rates = _rates(goodputs, args.points)
    sweeps = _sweeps(search, dict(chosen), None, args.quiet, rates)
    print(f"{args.gpus} GPUs, {args.profile}, {args.workload}, TTFT <= {args.slo_ttft_ms} ms, TPOT <= {args.slo_tpot_ms} ms")
    print(vllm_table(chosen, goodputs, sweeps))
    result = {
        "profile": args.profile, "workload": args.workload, "gpus": args.gpus, "slo": asdict(search.slo),
        "layouts": {p: x.row() for p, x in chosen.items()}, "goodput": goodputs, "sweeps": sweeps,
    }
    _write(out / "compare_vllm.json", result)
    _plot_sweeps(sweeps, out / "attainment_vs_rate.png", "SLO attainment against rate", "attainment")
    _plot_sweeps(sweeps, out / "jct_vs_rate.png", "mean JCT (s) against rate", "jct_mean_s")
    print(f"wrote {out / 'compare_vllm.json'} and plots in {out}")
    return result


def gpu_table(best: dict[str, RunMetrics | None], rate: float) -> str:
    head = f"{'policy':<10} {'GPUs':>5} {'layout':<22} {'goodput/GPU':>11} {'attain':>7} {'JCT mean s':>10} {'JCT p90 s':>9}"
    lines = [head, "-" * len(head)]
    for pol, m in best.items():
        if m is None:
            lines.append(f"{pol:<10} {'>max':>5} {'(none within --max-gpus)':<22}")
            continue
        lines.append(f"{pol:<10} {m.gpus:>5} {m.layout:<22} {rate / m.gpus:>11.2f} {m.attainment:>7.3f} "
                     f"{m.jct_ms['mean'] / 1e3:>10.2f} {m.jct_ms['p90'] / 1e3:>9.2f}")
    return "\n".join(lines)


def vllm_table(chosen: dict[str, Layout], goodputs: dict[str, float], sweeps: dict[str, list[dict[str, Any]]]) -> str:
    head = f"{'policy':<10} {'layout':<22} {'goodput r/s':>11} {'at rate':>8} {'attain':>7} {'JCT mean s':>10} {'JCT p90 s':>9}"
    lines = [head, "-" * len(head)]
    for pol, lay in chosen.items():
        pts = sweeps.get(pol) or []
        top = pts[-1] if pts else None
        lines.append(
            f"{pol:<10} {lay.shape.label:<22} {goodputs[pol]:>11.2f} "
            + (f"{top['rate']:>8.2f} {top['attainment']:>7.3f} {top['jct_mean_s']:>10.2f} {top['jct_p90_s']:>9.2f}" if top else "")
        )
    return "\n".join(lines)


def _rates(goodputs: dict[str, float], points: int) -> list[float]:
    finite = [g for g in goodputs.values() if math.isfinite(g) and g > 0]
    top = 1.5 * max(finite) if finite else 1.0
    return [round(top * (i + 1) / points, 3) for i in range(points)]


def _sweeps(search: Search, chosen: dict[str, Layout | None], rate: float | None, quiet: bool,
            rates: list[float] | None = None, points: int = 6) -> dict[str, list[dict[str, Any]]]:
    if rates is None:
        assert rate is not None
        rates = [round(rate * f, 3) for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)[:points]]
    out: dict[str, list[dict[str, Any]]] = {}
    for pol, lay in chosen.items():
        if lay is None:
            continue
        pts = []
        for r in tqdm(rates, desc=f"sweep {pol}", unit="rate", disable=quiet):
            opts = search.policy_options if pol == "ecoserve" else {}
            m, _, _ = simulate(lay, search.model, search.requests(r), search.slo, search.hw, opts)
            pts.append({"rate": r, "attainment": m.attainment, "jct_mean_s": m.jct_ms["mean"] / 1e3,
                        "jct_p90_s": m.jct_ms["p90"] / 1e3, "throughput_rps": m.throughput_rps,
                        "layout": lay.shape.label, "gpus": lay.shape.gpus})
        out[pol] = pts
    return out


def _saving(best: dict[str, RunMetrics | None]) -> float | None:
    eco, ds = best.get("ecoserve"), best.get("distserve")
    if eco is None or ds is None:
        return None
    return 1 - eco.gpus / ds.gpus


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _plot_gpus(best: dict[str, RunMetrics | None], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p, m in best.items() if m is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, [best[p].gpus for p in names])  # type: ignore[union-attr]
    ax.set_ylabel("GPUs")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweeps(sweeps: dict[str, list[dict[str, Any]]], path: Path, title: str, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for pol, pts in sweeps.items():
        ax.plot([q["rate"] for q in pts], [q[key] for q in pts], marker="o", label=f"{pol} ({pts[0]['layout']})" if pts else pol)
    ax.set_xlabel("request rate (req/s)")
    ax.set_title(title, fontsize=9)
    if key == "attainment":
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

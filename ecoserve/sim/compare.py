"""Head-to-head comparisons on the simulator: `ecoserve sim`, `bench compare-distserve`,
`bench compare-vllm`. Each prints a table and writes JSON (and PNG plots for the comparisons).

- compare-distserve: for a target rate, the fewest GPUs each policy needs to keep SLO
  attainment >= 90% (`experiment.min_gpus`, every layout each policy accepts), then attainment
  against rate for each policy's chosen layout. The paper's claim: up to 78% fewer GPUs than DistServe.
- compare-vllm: on the same number of GPUs, each policy's best layout: goodput (throughput at
  equal latency, i.e. the highest rate meeting the SLOs), then JCT and attainment at a common
  rate sweep. The paper's claims: up to 4x throughput, 91% lower JCT, 91% higher attainment.
Every search and sweep runs once per seed (`--seed S --seeds K`); tables give mean (min–max).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from ecoserve.config import ROLES, ClusterShape
from ecoserve.coordinator.policy import check_layout, layout_kinds
from ecoserve.sim.experiment import (
    SLO, Layout, RunMetrics, Search, goodput, hardware, layouts, min_gpus, simulate, spec_policy,
)
from ecoserve.sim.specs import Spread, parse_policies, policy_label, seed_list, settings_line, settings_row, spread
from ecoserve.sim.workloads import make_workload

def metrics_table(rows: Sequence[RunMetrics]) -> str:
    head = (f"{'policy':<24} {'layout':<22} {'GPUs':>4} {'rate':>7} {'done':>6} {'attain':>7} {'TTFT p50':>9} "
            f"{'TTFT p90':>9} {'TPOT p50':>9} {'TPOT p90':>9} {'JCT mean':>9} {'JCT p90':>9} {'tok/s':>8} "
            f"{'KV used':>7} {'KV resv':>7} {'preempt':>7}")
    lines = [head, "-" * len(head)]
    for m in rows:
        lines.append(
            f"{policy_label(m.policy):<24} {m.layout:<22} {m.gpus:>4} {m.rate:>7.2f} {m.finished:>6} {m.attainment:>7.3f} "
            f"{m.ttft_ms['p50']:>9.1f} {m.ttft_ms['p90']:>9.1f} {m.tpot_ms['p50']:>9.1f} {m.tpot_ms['p90']:>9.1f} "
            f"{m.jct_ms['mean']:>9.0f} {m.jct_ms['p90']:>9.0f} {m.throughput_tok_s:>8.0f} {m.kvc_used:>7.2f} "
            f"{m.kvc_reserved:>7.2f} {m.preemptions:>7}"
        )
    return "\n".join(lines)


def run_sim(args: Any, options: dict[str, Any]) -> int:
    """`ecoserve sim`: one run, the DESIGN §8 metric table."""
    layout = Layout(args.policy, _sim_shape(args))
    hw = hardware(args.link_gbs)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    workload = make_workload(args.workload, args.num_requests, args.rate, args.seed)
    bar = tqdm(total=len(workload), desc=f"sim {args.policy}", unit="req", disable=args.quiet)
    m, res, _ = simulate(layout, args.model, workload, slo, hw, policy_options=options, progress=bar.update,
                         max_tokens=args.max_tokens)
    bar.close()
    if args.rate is not None:
        m.rate = args.rate
    print(f"{args.model}, {args.workload}, {len(workload)} requests, seed {args.seed}, "
          f"KV link {args.link_gbs:g} GB/s per GPU, max_tokens {args.max_tokens}")
    print(metrics_table([m]))
    print(f"simulated {m.num_requests} requests in {m.wall_s:.2f} s wall ({m.num_requests / max(m.wall_s, 1e-9):,.0f} "
          f"requests/s), {res.events:,} events, {res.schedule_calls:,} scheduling rounds "
          f"(p50 {m.schedule_us_p50:.0f} us, p99 {m.schedule_us_p99:.0f} us)")
    if args.out:
        _write(Path(args.out), {"settings": {"seed": args.seed, "link_gbs": args.link_gbs, "layout": layout.row()},
                                "metrics": m.row(), "counters": res.counters, "events": res.events,
                                "schedule_calls": res.schedule_calls})
        print(f"wrote {args.out}")
    return 0


def _sim_shape(args: Any) -> ClusterShape:
    """The flags' shape. With no counts, the policy's first kind of layout, one instance per role
    (1 prefill + 1 decode, or 1 mixed); a kind given in part gets 1 of its missing roles. Counts
    the policy cannot run (its `needs_roles`) are refused, never dropped."""
    policy = spec_policy(args.policy)
    counts = {role: getattr(args, role) or 0 for role in ROLES}
    asked = {role for role, n in counts.items() if n}
    kinds = [k for k in layout_kinds(policy) if asked <= k]
    if not kinds:
        check_layout(policy, counts)  # raises, naming the layouts the policy accepts
    kind = kinds[0]
    full = {role: (counts[role] or 1) if role in kind else 0 for role in ROLES}
    return ClusterShape(full["prefill"], args.tp_prefill, full["decode"], args.tp_decode, full["mixed"], args.tp_mixed)


def _setup(args: Any, options: dict[str, Any]) -> tuple[Path, Search, list[str], list[int]]:
    """The output folder (made), the search both comparisons run, the policy specs, the seeds."""
    policies, seeds = parse_policies(args.policies), seed_list(args.seed, args.seeds)
    for pol in policies:
        spec_policy(pol)  # an option the policy refuses fails now, before any search
    search = Search(args.profile, args.workload, SLO(args.slo_ttft_ms, args.slo_tpot_ms), args.num_requests,
                    args.min_duration_s, seeds[0], hw=hardware(args.link_gbs), policy_options=options,
                    max_tokens=args.max_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, search, policies, seeds


def header(search: Search, seeds: Sequence[int]) -> str:
    return settings_line(search.num_requests, search.min_duration_s, seeds, search.hw.link_bytes_per_s / 1e9,
                         search.max_tokens)


def settings(search: Search, seeds: Sequence[int]) -> dict[str, Any]:
    return {"profile": search.model, "workload": search.workload, "slo": asdict(search.slo), "goal": search.goal,
            **settings_row(search.num_requests, search.min_duration_s, seeds, search.hw.link_bytes_per_s / 1e9,
                            search.max_tokens)}


def compare_distserve(args: Any, options: dict[str, Any]) -> dict[str, Any]:
    out, search, policies, seeds = _setup(args, options)
    found: dict[str, list[tuple[Layout | None, RunMetrics | None]]] = {}
    probes: dict[str, list[list[dict[str, Any]]]] = {}
    for pol in policies:
        found[pol], probes[pol] = [], []
        for sd in seeds:
            bar = tqdm(desc=f"GPU search {pol} seed {sd}", unit="layout", disable=args.quiet)
            lay, m, tried = min_gpus(search.with_seed(sd), pol, args.rate, args.max_gpus, on_probe=lambda _m: bar.update(1))
            bar.close()
            found[pol].append((lay, m))
            probes[pol].append([t.row() for t in tried])
    best = {pol: gpu_row(runs, seeds) for pol, runs in found.items()}
    print(f"fewest GPUs for {args.rate} req/s at >= {search.goal:.0%} attainment "
          f"(TTFT <= {args.slo_ttft_ms} ms, TPOT <= {args.slo_tpot_ms} ms), {args.profile}, {args.workload}")
    print(header(search, seeds))
    print(gpu_table(best, args.rate))
    # The sweep runs each policy's layout that met the goal on the most GPUs: it met it on every seed that found one.
    chosen = {pol: max((lay for lay, _ in runs if lay), key=lambda x: x.shape.gpus, default=None)
              for pol, runs in found.items()}
    sweeps = sweep(search, seeds, chosen, [round(args.rate * f, 3) for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)], args.quiet)
    saving = _saving(found)
    result = {
        "settings": {**settings(search, seeds), "rate": args.rate, "max_gpus": args.max_gpus},
        "summary": {"gpu_saving_vs_distserve": saving.mean if saving else None,
                    **{f"gpus_{pol}": best[pol]["gpus"]["mean"] if best[pol]["gpus"] else None for pol in policies}},
        "labels": {pol: policy_label(pol) for pol in policies},
        "best": best, "probes": probes, "sweeps": sweeps,
        "gpu_saving_vs_distserve": saving.row() if saving else None,
    }
    _write(out / "compare_distserve.json", result)
    _plot_gpus(best, out / "gpus.png", f"GPUs for {args.rate} req/s ({args.profile}, {args.workload}, {len(seeds)} seeds)")
    _plot_sweeps(sweeps, out / "attainment_vs_rate.png", "SLO attainment against rate", "attainment")
    print(f"wrote {out / 'compare_distserve.json'}, {out / 'gpus.png'}, {out / 'attainment_vs_rate.png'}")
    return result


def gpu_row(runs: list[tuple[Layout | None, RunMetrics | None]], seeds: Sequence[int]) -> dict[str, Any]:
    """One policy's GPU search over the seeds: the GPU count's spread over the seeds that found a
    layout, the layout and metrics of each seed (None: nothing within --max-gpus)."""
    ok = [m for _, m in runs if m is not None]
    return {"gpus": spread([m.gpus for m in ok]).row() if ok else None,
            "attainment": spread([m.attainment for m in ok]).row() if ok else None,
            "jct_mean_s": spread([m.jct_ms["mean"] / 1e3 for m in ok]).row() if ok else None,
            "not_found": [sd for sd, (lay, _) in zip(seeds, runs) if lay is None],
            "per_seed": [{"seed": sd, "layout": lay.row() if lay else None, "label": lay.shape.label if lay else None,
                          "metrics": m.row() if m else None} for sd, (lay, m) in zip(seeds, runs)]}


def compare_vllm(args: Any, options: dict[str, Any]) -> dict[str, Any]:
    out, search, policies, seeds = _setup(args, options)
    chosen: dict[str, Layout] = {}
    goodputs: dict[str, Spread] = {}
    tried: dict[str, dict[str, Any]] = {}
    for pol in policies:
        cands = [x for x in layouts(pol, args.profile, args.gpus) if x.shape.gpus == args.gpus]
        if not cands:
            raise ValueError(f"no {pol} layout uses exactly {args.gpus} GPUs with the TP degrees of {args.profile}")
        chosen[pol], goodputs[pol], tried[pol] = best_layout(search, seeds, cands, args.rel_tol, args.quiet)
    rates = _rates({p: g.mean for p, g in goodputs.items()}, args.points)
    sweeps = sweep(search, seeds, dict(chosen), rates, args.quiet)
    print(f"{args.gpus} GPUs, {args.profile}, {args.workload}, TTFT <= {args.slo_ttft_ms} ms, TPOT <= {args.slo_tpot_ms} ms")
    print(header(search, seeds))
    print(vllm_table(chosen, goodputs, sweeps))
    base = goodputs.get("vllm")
    result = {
        "settings": {**settings(search, seeds), "gpus": args.gpus},
        "summary": {f"goodput_{p}": g.mean for p, g in goodputs.items()}
        | {"ecoserve_vs_vllm": (goodputs["ecoserve"].mean / base.mean) if base and base.mean > 0 and "ecoserve" in goodputs else None},
        "labels": {pol: policy_label(pol) for pol in policies}, "gpus": args.gpus,
        "layouts": {p: x.row() for p, x in chosen.items()}, "goodput": {p: g.row() for p, g in goodputs.items()},
        "candidates": tried, "sweeps": sweeps,
    }
    _write(out / "compare_vllm.json", result)
    _plot_sweeps(sweeps, out / "attainment_vs_rate.png", "SLO attainment against rate", "attainment")
    _plot_sweeps(sweeps, out / "jct_vs_rate.png", "mean JCT (s) against rate", "jct_mean_s")
    print(f"wrote {out / 'compare_vllm.json'} and plots in {out}")
    return result


def best_layout(search: Search, seeds: Sequence[int], cands: Sequence[Layout], rel_tol: float, quiet: bool = True,
                ) -> tuple[Layout, Spread, dict[str, Any]]:
    """The candidate with the highest mean goodput over the seeds, that goodput, and every
    candidate's (by layout label)."""
    best: tuple[Layout, Spread] | None = None
    tried: dict[str, Any] = {}
    for lay in tqdm(cands, desc=f"goodput {cands[0].policy if cands else ''}", unit="layout", disable=quiet):
        g = spread([goodput(search.with_seed(sd), lay, rel_tol=rel_tol)[0] for sd in seeds])
        tried[lay.shape.label] = g.row()
        if best is None or g.mean > best[1].mean:
            best = (lay, g)
    assert best is not None
    return best[0], best[1], tried


def gpu_table(best: dict[str, dict[str, Any]], rate: float) -> str:
    """GPUs per policy (mean (min–max) over the seeds) and the layout each seed found."""
    head = (f"{'policy':<24} {'GPUs':>14} {'goodput/GPU':>11} {'attain':>7} {'JCT mean s':>10}  "
            "layout per seed")
    lines = [head, "-" * len(head)]
    for pol, row in best.items():
        per = " / ".join(f"{r['seed']}: {r['label'] or '> max'}" for r in row["per_seed"])
        if row["gpus"] is None:
            lines.append(f"{policy_label(pol):<24} {'> max':>14} {'':>11} {'':>7} {'':>10}  {per}")
            continue
        g = Spread(tuple(row["gpus"]["values"]))
        missing = f" ({len(row['not_found'])} seeds > max)" if row["not_found"] else ""
        lines.append(f"{policy_label(pol):<24} {g.fmt(1):>14} {rate / g.mean:>11.2f} {row['attainment']['mean']:>7.3f} "
                     f"{row['jct_mean_s']['mean']:>10.2f}  {per}{missing}")
    return "\n".join(lines)


def vllm_table(chosen: dict[str, Layout], goodputs: dict[str, Spread], sweeps: dict[str, list[dict[str, Any]]]) -> str:
    head = (f"{'policy':<24} {'layout':<18} {'goodput r/s':>20} {'at rate':>8} {'attain':>7} {'JCT mean s':>10} "
            f"{'JCT p90 s':>9}")
    lines = [head, "-" * len(head)]
    for pol, lay in chosen.items():
        pts = sweeps.get(pol) or []
        top = pts[-1] if pts else None
        lines.append(
            f"{policy_label(pol):<24} {lay.shape.label:<18} {goodputs[pol].fmt():>20} "
            + (f"{top['rate']:>8.2f} {top['attainment']:>7.3f} {top['jct_mean_s']:>10.2f} {top['jct_p90_s']:>9.2f}" if top else "")
        )
    return "\n".join(lines)


def _rates(goodputs: dict[str, float], points: int) -> list[float]:
    finite = [g for g in goodputs.values() if math.isfinite(g) and g > 0]
    top = 1.5 * max(finite) if finite else 1.0
    return [round(top * (i + 1) / points, 3) for i in range(points)]


def sweep(search: Search, seeds: Sequence[int], chosen: dict[str, Layout | None], rates: Sequence[float],
            quiet: bool) -> dict[str, list[dict[str, Any]]]:
    """Each chosen layout at each rate, once per seed: means, and each figure's min and max."""
    out: dict[str, list[dict[str, Any]]] = {}
    for pol, lay in chosen.items():
        if lay is None:
            continue
        pts = []
        for r in tqdm(rates, desc=f"sweep {pol}", unit="rate", disable=quiet):
            runs = []
            for sd in seeds:
                s = search.with_seed(sd)
                runs.append(simulate(lay, s.model, s.requests(r), s.slo, s.hw, s.options_for(lay),
                                     max_tokens=s.max_tokens)[0])
            figs = {"attainment": spread([m.attainment for m in runs]), "jct_mean_s": spread([m.jct_ms["mean"] / 1e3 for m in runs]),
                    "jct_p90_s": spread([m.jct_ms["p90"] / 1e3 for m in runs]),
                    "throughput_rps": spread([m.throughput_rps for m in runs])}
            pts.append({"rate": r, **{k: v.mean for k, v in figs.items()}, **{f"{k}_range": [v.lo, v.hi] for k, v in figs.items()},
                        "layout": lay.shape.label, "gpus": lay.shape.gpus})
        out[pol] = pts
    return out


def _saving(found: dict[str, list[tuple[Layout | None, RunMetrics | None]]]) -> Spread | None:
    """EcoServe's GPU saving against DistServe, seed by seed (seeds where both found a layout)."""
    pairs = zip(found.get("ecoserve", []), found.get("distserve", []))
    saved = [1 - e.gpus / d.gpus for (_, e), (_, d) in pairs if e is not None and d is not None]
    return spread(saved) if saved else None


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _plot_gpus(best: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p, row in best.items() if row["gpus"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    means = [best[p]["gpus"]["mean"] for p in names]
    errs = [[m - best[p]["gpus"]["min"] for p, m in zip(names, means)], [best[p]["gpus"]["max"] - m for p, m in zip(names, means)]]
    ax.bar([policy_label(p) for p in names], means, yerr=errs, capsize=3)
    ax.tick_params(axis="x", labelsize=7)
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
        xs = [q["rate"] for q in pts]
        line, = ax.plot(xs, [q[key] for q in pts], marker="o", label=f"{policy_label(pol)} ({pts[0]['layout']})" if pts else pol)
        ax.fill_between(xs, [q[f"{key}_range"][0] for q in pts], [q[f"{key}_range"][1] for q in pts],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("request rate (req/s)")
    ax.set_title(title, fontsize=9)
    if key == "attainment":
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

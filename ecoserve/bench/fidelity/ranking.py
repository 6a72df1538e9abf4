"""`ecoserve bench live-vs-sim`'s figures: per policy and rate, each side's SLO attainment and
latencies; goodput over the rate set; the ranking of the policies on each side.

Both sides are scored alike over the same requests: a request meets its SLOs when it finished
with every output token, its TTFT <= the TTFT target and (with more than one output token) its
TPOT <= the TPOT target (`bench serve`'s rule); attainment is the share of all requests sent
that met them. Goodput is the highest rate of the set whose attainment is >= the goal (0 where
none reaches it). Percentiles are numpy's linear ones, as `bench sim-fidelity` takes them.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ecoserve.bench.fidelity.report import Latencies, measured, simulated
from ecoserve.report import print_table

SIDES = ("live", "sim")


@dataclass(frozen=True)
class Figures:
    """One side of one (policy, rate) run. Times in ms."""

    requests: int
    completed: int
    attainment: float
    jct_mean_ms: float
    jct_p90_ms: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float


def _figures(lat: Latencies, sent: int, met: int) -> Figures:
    f = lat.figures()
    jct_p90 = float(np.percentile(lat.e2e_ms, 90)) if lat.e2e_ms else math.nan
    return Figures(sent, len(lat.e2e_ms), met / sent if sent else math.nan, f["jct_mean"], jct_p90,
                   f["ttft_p50"], f["ttft_p90"], f["tpot_p50"], f["tpot_p90"])


def live_figures(result: Any) -> Figures:
    """From `bench serve`'s BenchResult, scored against the SLO its requests carried."""
    return _figures(measured(result), len(result.requests), sum(r.meets(result.slo) for r in result.requests))


def sim_figures(res: Any, sent: int, ttft_ms: float, tpot_ms: float) -> Figures:
    """From a SimResult of `sent` requests (an errored or missing request is a miss)."""
    met = sum(1 for r in res.requests if r.finish_reason != "error" and r.ttft_ms <= ttft_ms
              and (r.output_len <= 1 or r.tpot_ms <= tpot_ms))
    return _figures(simulated(res), sent, met)


def goodput(rates: Sequence[float], attainments: Sequence[float], goal: float) -> float:
    """The highest rate whose attainment is >= goal; 0.0 where none is."""
    return max((r for r, a in zip(rates, attainments) if a >= goal), default=0.0)


def ranking(values: dict[str, float]) -> list[list[str]]:
    """Policies from best (highest value) to worst; equal values share a place."""
    places: list[list[str]] = []
    for name in sorted(values, key=lambda n: -values[n]):
        if places and values[places[-1][0]] == values[name]:
            places[-1].append(name)
        else:
            places.append([name])
    return [sorted(p) for p in places]


def show(places: list[list[str]]) -> str:
    """`vllm > distserve = ecoserve`."""
    return " > ".join(" = ".join(p) for p in places)


@dataclass(frozen=True)
class Comparison:
    """Every figure of a live-vs-sim run, by policy then rate then side."""

    rates: list[float]
    goal: float
    layouts: dict[str, str]  # policy -> `2 mixed`, `1P+1D`
    figures: dict[str, dict[float, dict[str, Figures]]]

    def goodputs(self, side: str) -> dict[str, float]:
        return {p: goodput(self.rates, [self.figures[p][r][side].attainment for r in self.rates], self.goal)
                for p in self.figures}

    def rank_by_goodput(self, side: str) -> list[list[str]]:
        return ranking(self.goodputs(side))

    def rank_at(self, rate: float, side: str) -> list[list[str]]:
        return ranking({p: self.figures[p][rate][side].attainment for p in self.figures})

    def summary(self) -> dict[str, Any]:
        """The flat summary: goodput per policy and side, the rankings, and whether they agree."""
        out: dict[str, Any] = {}
        for side in SIDES:
            for p, g in self.goodputs(side).items():
                out[f"{p}_goodput_{side}_rps"] = g
        live, sim = self.rank_by_goodput("live"), self.rank_by_goodput("sim")
        out |= {"goodput_ranking_live": show(live), "goodput_ranking_sim": show(sim),
                "goodput_ranking_agrees": live == sim}
        for r in self.rates:
            for side in SIDES:
                for p in self.figures:
                    out[f"{p}_attainment_{side}_at_{r:g}"] = self.figures[p][r][side].attainment
            agree = self.rank_at(r, "live") == self.rank_at(r, "sim")
            out[f"attainment_ranking_live_at_{r:g}"] = show(self.rank_at(r, "live"))
            out[f"attainment_ranking_sim_at_{r:g}"] = show(self.rank_at(r, "sim"))
            out[f"attainment_ranking_agrees_at_{r:g}"] = agree
        out["attainment_rankings_agree_at_every_rate"] = all(
            self.rank_at(r, "live") == self.rank_at(r, "sim") for r in self.rates)
        return out

    def details(self) -> dict[str, Any]:
        return {p: {f"{r:g}": {side: asdict(f) for side, f in by_side.items()} for r, by_side in by_rate.items()}
                for p, by_rate in self.figures.items()}


def print_comparison(c: Comparison, title: str) -> None:
    rows = []
    for p, by_rate in c.figures.items():
        for r, by_side in by_rate.items():
            for side, f in by_side.items():
                rows.append((f"{p} ({c.layouts[p]})", f"{r:g}", side, f"{f.completed}/{f.requests}",
                             f"{100 * f.attainment:.0f}%", f.jct_mean_ms / 1e3, f.jct_p90_ms / 1e3, f.ttft_p50_ms,
                             f.ttft_p90_ms, f.tpot_p50_ms, f.tpot_p90_ms))
    print_table(title, ["policy", "req/s", "side", "done", "SLO att.", "JCT mean s", "JCT p90 s", "TTFT p50",
                        "TTFT p90", "TPOT p50", "TPOT p90"], rows)
    live, sim = c.goodputs("live"), c.goodputs("sim")
    print_table(f"Goodput: the highest rate of {', '.join(f'{r:g}' for r in c.rates)} req/s with >= "
                f"{c.goal:.0%} SLO attainment (0: none)", ["policy", "layout", "live req/s", "sim req/s"],
                [(p, c.layouts[p], live[p], sim[p]) for p in c.figures])
    rank_rows = [("goodput", show(c.rank_by_goodput("live")), show(c.rank_by_goodput("sim")),
                  _yes(c.rank_by_goodput("live") == c.rank_by_goodput("sim")))]
    rank_rows += [(f"attainment at {r:g} req/s", show(c.rank_at(r, "live")), show(c.rank_at(r, "sim")),
                   _yes(c.rank_at(r, "live") == c.rank_at(r, "sim"))) for r in c.rates]
    print_table("Ranking, best first", ["by", "live", "simulated", "same?"], rank_rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def plot(c: Comparison, path: str, title: str) -> None:
    """Attainment against rate: live solid, simulated dashed, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, p in enumerate(c.figures):
        for side, style in (("live", "-o"), ("sim", "--x")):
            ax.plot(c.rates, [100 * c.figures[p][r][side].attainment for r in c.rates], style, color=f"C{i}",
                    label=f"{p} ({c.layouts[p]}), {side}")
    ax.axhline(100 * c.goal, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()  # only the rates run are labelled
    ax.set_xticks(c.rates, [f"{r:g}" for r in c.rates])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

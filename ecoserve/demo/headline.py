"""The head-to-head the project exists for, at the end of `ecoserve demo`: the fewest GPUs
EcoServe and DistServe need for DistServe's own OPT-13B chatbot setting (ShareGPT, TTFT 250 ms,
TPOT 100 ms, 90% attainment, DistServe's A100 fits) at two target rates, from the simulator.

The two rates (4 and 16 requests/s by default, `--headline-rates`) are round figures inside
the range DistServe's paper sweeps for this setting, fixed before any run; the runs are short
(300 requests over at least 30 s), so the figures are indicative: `ecoserve bench
compare-distserve` and `ecoserve bench results` make the steady-state ones.
"""

from __future__ import annotations

import time
from typing import Any

from ecoserve.sim.experiment import SLO, Search, min_gpus

SETTING = ("opt-13b", "sharegpt", SLO(250, 100))
POLICIES = ("ecoserve", "distserve")


def head_to_head(rates: tuple[float, ...] = (4.0, 16.0), num_requests: int = 300, min_duration_s: float = 30.0,
                 max_gpus: int = 32) -> dict[str, Any]:
    """Per rate and policy: the fewest GPUs that meet the goal, and the layout."""
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"the head-to-head needs target rates > 0 (requests/s), got {list(rates)}")
    t0 = time.perf_counter()
    model, workload, slo = SETTING
    search = Search(model, workload, slo, num_requests, min_duration_s)
    rows = []
    for rate in rates:
        for pol in POLICIES:
            lay, _, _ = min_gpus(search, pol, rate, max_gpus)
            rows.append({"rate": rate, "policy": pol, "gpus": lay.shape.gpus if lay else None,
                         "layout": lay.shape.label if lay else None})
    return {"rows": rows, "num_requests": num_requests, "min_duration_s": min_duration_s, "max_gpus": max_gpus,
            "wall_s": time.perf_counter() - t0}


def render(result: dict[str, Any]) -> str:
    model, workload, slo = SETTING
    lines = [
        f"GPUs needed, simulated: {model}, {workload}, TTFT <= {slo.ttft_ms:.0f} ms, TPOT <= {slo.tpot_ms:.0f} ms "
        f"(DistServe's chatbot setting and A100 fits; {result['num_requests']} requests per run)",
        f"{'rate r/s':>9}  {'policy':<10} {'GPUs':>5}  layout",
    ]
    for row in result["rows"]:
        gpus = row["gpus"] if row["gpus"] is not None else "none"
        lines.append(f"{row['rate']:>9.2f}  {row['policy']:<10} {gpus!s:>5}  {row['layout'] or 'none up to ' + str(result['max_gpus']) + ' GPUs'}")
    lines.append(f"(>= {result['num_requests']} requests over >= {result['min_duration_s']:.0f} s per run; simulated in "
                 f"{result['wall_s']:.1f} s; steady-state figures: ecoserve bench compare-distserve)")
    return "\n".join(lines)

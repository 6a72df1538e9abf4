"""The head-to-head the project exists for, at the end of `ecoserve demo`: the fewest GPUs
EcoServe and DistServe need for DistServe's own OPT-13B chatbot setting (ShareGPT, TTFT 250 ms,
TPOT 100 ms, 90% attainment, DistServe's A100 fits) at two target rates, from the simulator.

The rates are not picked: the first is what one DistServe unit (1 prefill + 1 decode instance,
TP1) sustains on the same workload, the second four times that. The runs are short (a few
hundred requests), so the figures are indicative; `ecoserve bench compare-distserve` and
`ecoserve bench results` make the steady-state ones.
"""

from __future__ import annotations

import time
from typing import Any

from ecoserve.config import ClusterShape
from ecoserve.sim.experiment import SLO, Layout, Search, goodput, min_gpus

SETTING = ("opt-13b", "sharegpt", SLO(250, 100))
POLICIES = ("ecoserve", "distserve")


def head_to_head(num_requests: int = 300, min_duration_s: float = 30.0, max_gpus: int = 32) -> dict[str, Any]:
    """Rows of (rate, policy, GPUs, layout label) at the two rates, and the unit goodput."""
    t0 = time.perf_counter()
    model, workload, slo = SETTING
    search = Search(model, workload, slo, num_requests, min_duration_s)
    unit, _ = goodput(search, Layout("distserve", ClusterShape(1, 1, 1, 1)), rel_tol=0.1)
    rows = []
    for rate in (round(unit, 2), round(4 * unit, 2)):
        for pol in POLICIES:
            lay, _, _ = min_gpus(search, pol, rate, max_gpus)
            rows.append({"rate": rate, "policy": pol, "gpus": lay.shape.gpus if lay else None,
                         "layout": lay.shape.label if lay else None})
    return {"unit_goodput": unit, "rows": rows, "num_requests": num_requests, "wall_s": time.perf_counter() - t0}


def render(result: dict[str, Any]) -> str:
    model, workload, slo = SETTING
    lines = [
        f"GPUs needed, simulated: {model}, {workload}, TTFT <= {slo.ttft_ms:.0f} ms, TPOT <= {slo.tpot_ms:.0f} ms "
        f"(DistServe's chatbot setting and A100 fits; {result['num_requests']} requests per run)",
        f"{'rate r/s':>9}  {'policy':<10} {'GPUs':>5}  layout",
    ]
    for row in result["rows"]:
        gpus = row["gpus"] if row["gpus"] is not None else "none"
        lines.append(f"{row['rate']:>9.2f}  {row['policy']:<10} {gpus!s:>5}  {row['layout'] or 'no layout up to the cap'}")
    lines.append(f"(one DistServe 1P+1D unit sustains {result['unit_goodput']:.2f} r/s; the second rate is four times it; "
                 f"{result['wall_s']:.1f} s)")
    return "\n".join(lines)

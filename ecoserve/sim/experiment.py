"""Experiments on the simulator: one run's metrics, goodput by bisection, GPU-count search.

Definitions (DESIGN §7–§8): a request meets its SLOs when its TTFT and its TPOT are both
within bounds; SLO attainment is the share of requests that do (a request that never finished
does not); goodput is the highest Poisson rate at which attainment stays >= `goal` (0.9),
found by doubling then bisection to `rel_tol`; the GPU count for a target rate is the fewest
GPUs over the layouts searched whose attainment at that rate is >= `goal`.

Layouts (a policy spec on a `ClusterShape`, see `specs.py`): every layout a policy accepts, as
its `needs_roles` says (DESIGN §4.2): prefill+decode instances × TP, and/or replicas × TP of
mixed workers (`distserve` takes both). A layout a policy refuses is never run.
Every policy uses the same latency profile family, workload and SLOs.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from ecoserve.config import ROLES, ClusterShape
from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.policy import Policy, check_layout, layout_kinds
from ecoserve.data.workload import WorkloadRequest
from ecoserve.latency.cost import CostModel
from ecoserve.latency.profile import LatencyProfile, load_profile, profile_names
from ecoserve.params import SLO
from ecoserve.sim.simulator import HardwareConfig, InstanceSpec, SimResult, Simulator, kv_bytes_per_token
from ecoserve.sim.specs import parse_policy
from ecoserve.sim.workloads import make_workload

POLICY_NAMES = ("ecoserve", "distserve", "vllm", "orca")
LINK_GBS = HardwareConfig().link_bytes_per_s / 1e9  # the default KV link, GB/s per GPU


def hardware(link_gbs: float = LINK_GBS) -> HardwareConfig:
    """The simulated hardware with a KV link of `link_gbs` GB/s (gigabytes) per GPU."""
    if not (link_gbs > 0 and math.isfinite(link_gbs)):
        raise ValueError(f"--link-gbs (the KV link, GB/s per GPU) must be a number > 0, got {link_gbs}")
    return HardwareConfig(link_bytes_per_s=link_gbs * 1e9)

@dataclass(frozen=True)
class Layout:
    """A policy spec (`vllm`, `vllm:prefill-priority`) on a cluster shape."""

    policy: str
    shape: ClusterShape

    def row(self) -> dict[str, Any]:
        """Flat, as the JSON outputs hold it: `{"policy", "prefill", "tp_prefill", ...}`."""
        return {"policy": self.policy, **asdict(self.shape)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Layout:
        fields = dict(row)
        return cls(fields.pop("policy"), ClusterShape(**fields))


def profile_for(model: str, tp: int) -> LatencyProfile:
    """The bundled profile of `model` at TP `tp` (`model` may also be a profile JSON path)."""
    if model.endswith(".json"):
        return load_profile(model)
    name = f"{model}-tp{tp}"
    if name not in profile_names():
        tps = sorted(int(n.rsplit("-tp", 1)[1]) for n in profile_names() if n.startswith(f"{model}-tp"))
        if not tps:
            models = sorted({n.rsplit("-tp", 1)[0] for n in profile_names() if not n.startswith("vllm-")})
            raise ValueError(f"unknown model {model!r} for the latency profiles; choose one of {models} or a .json profile")
        raise ValueError(f"no profile for {model} at TP {tp}; its profiles have TP {tps}")
    return load_profile(name)


def model_tps(model: str) -> list[int]:
    if model.endswith(".json"):
        return [1]
    tps = sorted(int(n.rsplit("-tp", 1)[1]) for n in profile_names() if n.startswith(f"{model}-tp"))
    if not tps:
        profile_for(model, 1)  # raises the clear error
    return tps


def instances(layout: Layout, model: str) -> list[InstanceSpec]:
    out: list[InstanceSpec] = []
    for role in ROLES:
        count, tp = layout.shape.count(role), layout.shape.tp(role)
        if count:
            out += [InstanceSpec(role, profile_for(model, tp), tp)] * count
    return out


def spec_policy(spec: str) -> Policy:
    """The policy of a spec, with the spec's options only (what it accepts, its name)."""
    p = parse_policy(spec)
    return make_policy(p.name, **dict(p.options))


def check(layout: Layout) -> None:
    """Refuse a layout its policy does not accept (its `needs_roles`), naming those it does."""
    check_layout(spec_policy(layout.policy), {role: layout.shape.count(role) for role in ROLES})


def build_policy(layout: Layout, model: str, slo: SLO, hw: HardwareConfig, options: dict[str, Any] | None = None) -> Any:
    """The layout's policy: the spec's options, then `options`, then the simulator's defaults for ecoserve."""
    spec = parse_policy(layout.policy)
    opts = {**dict(spec.options), **(options or {})}
    if spec.name == "ecoserve":
        role = "mixed" if layout.shape.mixed else "decode"  # where its reservations and decodes are
        tp = layout.shape.tp(role)
        prof = profile_for(model, tp)
        opts.setdefault("predictor", "oracle")
        opts.setdefault("slo_tpot_ms", slo.tpot_ms)
        opts.setdefault("costs", CostModel.from_profile(
            prof, hw.kv_bytes_per_token or kv_bytes_per_token(prof), hw.swap_bytes_per_s * tp,
        ))
    return make_policy(spec.name, **opts)


@dataclass
class RunMetrics:
    """One simulated run, in DESIGN §8's terms."""

    policy: str
    layout: str
    gpus: int
    rate: float
    num_requests: int
    finished: int
    attainment: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    jct_ms: dict[str, float]
    throughput_rps: float
    throughput_tok_s: float
    kvc_used: float  # decode-side mean share of capacity in use
    kvc_reserved: float  # decode-side mean share reserved (ecoserve; may exceed 1 with pipelining)
    preemptions: int
    extensions: int
    prediction_mae: float
    schedule_us_p50: float
    schedule_us_p99: float
    sim_s: float
    wall_s: float = 0.0
    stopped_early: bool = False

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _pcts(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    s = sorted(values)

    def q(x: float) -> float:
        return s[min(len(s) - 1, int(x * len(s)))]

    return {"mean": statistics.fmean(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def simulate(
    layout: Layout, model: str, workload: Sequence[WorkloadRequest], slo: SLO, hw: HardwareConfig | None = None,
    policy_options: dict[str, Any] | None = None, goal: float | None = None,
    progress: Callable[[int], None] | None = None, prompt_tokens: Sequence[Sequence[int]] | None = None,
    max_tokens: str | int = "context",
) -> tuple[RunMetrics, SimResult, Simulator]:
    """Run `workload` on `layout`. With `goal`, stop as soon as attainment >= goal is impossible.
    `max_tokens`: the cap each simulated client sends (`Simulator`: "context", "trace" or a number)."""
    import time

    hw = hw or HardwareConfig()
    check(layout)
    sim = Simulator(build_policy(layout, model, slo, hw, policy_options), instances(layout, model), hw,
                    max_tokens=max_tokens)
    allowance = None if goal is None else int(math.floor((1 - goal) * len(workload)))
    t0 = time.perf_counter()
    res = sim.run(workload, slo.ttft_ms, slo.tpot_ms, progress=progress, miss_allowance=allowance,
                  prompt_tokens=prompt_tokens)
    wall = time.perf_counter() - t0
    reqs = res.requests
    ok = sum(1 for r in reqs if slo.met_by(r.ttft_ms, r.tpot_ms))
    span = max((r.arrival_s + r.e2e_ms / 1e3 for r in reqs), default=0.0) - (workload[0].arrival_s if workload else 0.0)
    used = [u / c for _, u, _, c in res.kv_samples if c]
    reserved = [r / c for _, _, r, c in res.kv_samples if c]
    lc = sim.lifecycle
    n_pred = lc.counters["predicted"]
    sched = lc.schedule_us.summary("s")
    rate = (len(workload) - 1) / (workload[-1].arrival_s - workload[0].arrival_s) if len(workload) > 1 and workload[-1].arrival_s > workload[0].arrival_s else math.inf
    metrics = RunMetrics(
        policy=layout.policy, layout=layout.shape.label, gpus=layout.shape.gpus, rate=rate, num_requests=len(workload),
        finished=len(reqs), attainment=ok / len(workload) if workload else 0.0,
        ttft_ms=_pcts([r.ttft_ms for r in reqs]), tpot_ms=_pcts([r.tpot_ms for r in reqs if r.output_len > 1]),
        jct_ms=_pcts([r.e2e_ms for r in reqs]),
        throughput_rps=len(reqs) / span if span > 0 else 0.0,
        throughput_tok_s=sum(r.output_len for r in reqs) / span if span > 0 else 0.0,
        kvc_used=statistics.fmean(used) if used else 0.0, kvc_reserved=statistics.fmean(reserved) if reserved else 0.0,
        preemptions=int(lc.counters["preemptions"]), extensions=int(lc.counters["extensions"]),
        prediction_mae=lc.prediction_abs_error / n_pred if n_pred else 0.0,
        schedule_us_p50=sched.get("s.p50", 0.0), schedule_us_p99=sched.get("s.p99", 0.0),
        sim_s=res.duration_s, wall_s=wall, stopped_early=res.stopped_early,
    )
    return metrics, res, sim


@dataclass
class Search:
    """What a search needs besides the layout: model profile family, workload, SLOs, sizes."""

    model: str
    workload: str
    slo: SLO
    num_requests: int = 1000  # at least; more when `min_duration_s` of arrivals needs more
    min_duration_s: float = 120.0  # arrivals span at least this (steady state, not one burst)
    seed: int = 0
    goal: float = 0.9
    hw: HardwareConfig = field(default_factory=HardwareConfig)
    policy_options: dict[str, Any] = field(default_factory=dict)  # ecoserve's knobs (other policies take none)
    max_tokens: str | int = "context"  # what each simulated client sends (Simulator's `max_tokens`)

    def requests(self, rate: float) -> list[WorkloadRequest]:
        n = max(self.num_requests, math.ceil(rate * self.min_duration_s))
        return make_workload(self.workload, n, rate, self.seed)

    def prompts(self, n: int) -> Sequence[Sequence[int]] | None:
        """The prompts' token ids, for workloads that have them (none of the named ones)."""
        return None

    def with_seed(self, seed: int) -> Search:
        return replace(self, seed=seed)

    def options_for(self, layout: Layout) -> dict[str, Any]:
        """`policy_options` are ecoserve's knobs: the other policies run without them."""
        return self.policy_options if parse_policy(layout.policy).name == "ecoserve" else {}

    def attainment(self, layout: Layout, rate: float) -> RunMetrics:
        reqs = self.requests(rate)
        m, _, _ = simulate(layout, self.model, reqs, self.slo, self.hw, self.options_for(layout), goal=self.goal,
                           prompt_tokens=self.prompts(len(reqs)), max_tokens=self.max_tokens)
        m.rate = rate
        return m


def goodput(search: Search, layout: Layout, rel_tol: float = 0.05, start: float = 1.0,
            on_probe: Callable[[RunMetrics], None] | None = None) -> tuple[float, list[RunMetrics]]:
    """The highest rate (requests/s) with attainment >= goal, by doubling then bisection."""
    probes: list[RunMetrics] = []

    def ok(rate: float) -> bool:
        m = search.attainment(layout, rate)
        probes.append(m)
        if on_probe:
            on_probe(m)
        return m.attainment >= search.goal

    lo, hi = 0.0, start
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e5:
            return math.inf, probes
    if lo == 0.0:
        lo_try = hi / 2
        while lo_try > 1e-3 and not ok(lo_try):
            hi, lo_try = lo_try, lo_try / 2
        if lo_try <= 1e-3:
            return 0.0, probes
        lo = lo_try
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, probes


def layouts(policy: str, model: str, max_gpus: int, max_instances: int = 16) -> Iterator[Layout]:
    """Every layout `policy` (a spec) accepts up to `max_gpus`, of every kind its `needs_roles`
    names (prefill+decode, mixed replicas), fewest GPUs first."""
    tps = model_tps(model)
    found: list[Layout] = []
    for kind in layout_kinds(spec_policy(policy)):
        roles = [r for r in ROLES if r in kind]
        per_role = [[(r, n, tp) for n in range(1, max_instances + 1) for tp in tps] for r in roles]
        for combo in itertools.product(*per_role):
            shape = ClusterShape(**{k: v for r, n, tp in combo for k, v in ((r, n), (f"tp_{r}", tp))})
            if shape.gpus <= max_gpus:
                found.append(Layout(policy, shape))
    found.sort(key=lambda x: (x.shape.gpus, x.shape.num_instances, x.shape.label))
    yield from found


def min_gpus(search: Search, policy: str, rate: float, max_gpus: int = 64,
             on_probe: Callable[[RunMetrics], None] | None = None, failed: list[Layout] | None = None,
             max_instances: int = 16) -> tuple[Layout | None, RunMetrics | None, list[RunMetrics]]:
    """The layout `layouts()` lists first (fewest GPUs, then fewest instances, then label) whose
    attainment at `rate` is >= goal, with its metrics and every run simulated on the way.

    Assumption (monotone serving): more instances of a role, same TP degrees, never serve a rate
    worse, and a layout that fails a rate fails every higher one. Under it the answer is a minimal
    passing layout of its family (kind and TP degrees; a layout with fewer or equal instances of
    every role would otherwise pass with fewer GPUs), so the search walks each family's frontier
    instead of simulating every layout below the answer: a family of one role is bisected on its
    count; one of two roles is walked as a staircase (first role's count up, second's down: a pass
    tries one fewer of the second, a failure one more of the first), and no layout with more GPUs
    than the best found so far is simulated. That is tens of runs per family where trying every
    layout fewest-first took hundreds at eight DistServe units; the answer is the same
    (`tests/sim/test_simulator.py` checks it against that exhaustive search).

    A layout is skipped without simulating when one with fewer or equal instances of every role
    (same TP degrees) already failed. `failed` carries the layouts that failed a lower rate into a
    search at a higher one (a rate sweep); the list grows in place.
    """
    failed = [] if failed is None else failed
    probes: list[RunMetrics] = []
    best: list[tuple[Layout, RunMetrics]] = []

    def key(lay: Layout) -> tuple[int, int, str]:
        return (lay.shape.gpus, lay.shape.num_instances, lay.shape.label)

    def bound() -> int:
        return best[0][0].shape.gpus if best else max_gpus

    def passes(shape: ClusterShape) -> bool:
        layout = Layout(policy, shape)
        if any(_dominates(f, layout) for f in failed):
            return False
        m = search.attainment(layout, rate)
        probes.append(m)
        if on_probe:
            on_probe(m)
        if m.attainment >= search.goal:
            if not best or key(layout) < key(best[0][0]):
                best[:] = [(layout, m)]
            return True
        failed.append(layout)
        return False

    tps = model_tps(search.model)
    for kind in sorted(layout_kinds(spec_policy(policy)), key=len):  # one-role kinds first: a tight bound cheaply
        roles = [r for r in ROLES if r in kind]
        for tp_combo in itertools.product(tps, repeat=len(roles)):
            def shape(counts: Sequence[int]) -> ClusterShape:
                return ClusterShape(**{k: v for r, n, tp in zip(roles, counts, tp_combo)
                                       for k, v in ((r, n), (f"tp_{r}", tp))})
            if len(roles) == 1:
                (tp,) = tp_combo
                hi = min(max_instances, bound() // tp)
                if hi < 1 or not passes(shape([hi])):
                    continue
                lo = 0  # known to fail (no instances)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if passes(shape([mid])) else (mid, hi)
            elif len(roles) == 2:
                ta, tb = tp_combo
                i, j = 1, max_instances
                while i <= max_instances:
                    j = min(j, (bound() - ta * i) // tb)
                    if j < 1:
                        break
                    if passes(shape([i, j])):
                        j -= 1
                    else:
                        i += 1
            else:
                raise ValueError(f"layouts of {len(roles)} roles ({sorted(kind)}) are not searched; kinds of one or two roles are")
    return (best[0][0], best[0][1], probes) if best else (None, None, probes)


def _dominates(failed: Layout, candidate: Layout) -> bool:
    """`candidate` is of the same kind (roles) and TPs as `failed`, with no more of anything: it
    fails too. Layouts of different kinds (mixed, P:D) never dominate one another."""
    f, c = failed.shape, candidate.shape
    used = [r for r in ROLES if f.count(r)]
    if used != [r for r in ROLES if c.count(r)]:
        return False
    return all(c.tp(role) == f.tp(role) and c.count(role) <= f.count(role) for role in used)

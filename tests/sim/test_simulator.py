"""The discrete-event simulator: exact timings on a case worked by hand, every policy ending
every request with no leaks (also under memory pressure, misprediction and preemption),
determinism, early stopping, the searches, and bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ecoserve.cli import main
from ecoserve.config import ClusterShape
from ecoserve.data.workload import WorkloadRequest
from ecoserve.sim.experiment import SLO, Layout, Search, _dominates, check, goodput, hardware, layouts, min_gpus, simulate
from ecoserve.sim.specs import PolicySpec, parse_policy, policy_label
from ecoserve.latency.profile import load_profile
from ecoserve.sim.simulator import HardwareConfig, InstanceSpec, Simulator
from ecoserve.sim.workloads import WORKLOADS, make_workload
from ecoserve.coordinator.policies import make_policy

PROFILE = load_profile("opt-13b-tp1")


def test_one_request_timings_match_the_latency_model_exactly() -> None:
    hw = HardwareConfig(link_bytes_per_s=25e9, link_latency_s=1e-4)
    sim = Simulator(make_policy("distserve"), [InstanceSpec("prefill", PROFILE), InstanceSpec("decode", PROFILE)], hw)
    res = sim.run([WorkloadRequest(0.0, 100, 10)])
    (r,) = res.requests
    prefill_s = PROFILE.prefill_ms(100, 100 * 100) / 1e3
    transfer_s = 100 * 2 * 40 * 5120 * 2 / 25e9 + 1e-4  # OPT-13B fp16 KV, one GPU's link
    decode_s = sum(PROFILE.decode_ms(1, 100 + 1 + k) for k in range(9)) / 1e3  # 9 steps after the first token
    assert r.output_len == 10 and r.finish_reason == "stop"  # its trace length, under the client's cap
    assert r.ttft_ms == pytest.approx(prefill_s * 1e3)
    assert r.e2e_ms == pytest.approx((prefill_s + transfer_s + decode_s) * 1e3)
    assert r.tpot_ms == pytest.approx((transfer_s + decode_s) * 1e3 / 9)
    sim.assert_no_leaks()


def _random_workload(seed: int, n: int, rate: float) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(WorkloadRequest(t, rng.randint(1, 600), rng.randint(1, 300)))
    return out


def _cluster(policy: str, blocks: int) -> list[InstanceSpec]:
    if policy in ("vllm", "orca"):
        return [InstanceSpec("mixed", PROFILE, num_blocks=blocks)] * 2
    return [InstanceSpec("prefill", PROFILE, num_blocks=blocks), InstanceSpec("decode", PROFILE, num_blocks=blocks),
            InstanceSpec("decode", PROFILE, num_blocks=blocks)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["ecoserve", "distserve", "vllm", "orca"]),
    seed=st.integers(0, 10_000),
    rate=st.sampled_from([2.0, 20.0, 200.0]),
    blocks=st.sampled_from([60, 120, 400]),
    sigma=st.sampled_from([0.0, 0.8]),
    mode=st.sampled_from(["auto", "swap", "recompute"]),
)
def test_every_request_ends_once_and_nothing_leaks(policy: str, seed: int, rate: float, blocks: int, sigma: float,
                                                   mode: str) -> None:
    """Tiny pools (60 blocks: under 1,000 tokens) force waiting, local preemption (distserve,
    vllm) and, with noisy predictions, extensions and ordered preemption (ecoserve)."""
    opts = {}
    if policy == "ecoserve":
        opts = {"predictor": "oracle-noisy" if sigma else "oracle", "preempt_mode": mode, "margin": 0.0}
        if sigma:
            opts["predictor_options"] = {"sigma": sigma, "seed": seed}
    workload = _random_workload(seed, 60, rate)
    sim = Simulator(make_policy(policy, **opts), _cluster(policy, blocks))
    res = sim.run(workload, 1e9, 1e9)
    assert len(res.requests) == len(workload), res.counters
    assert [r.output_len for r in res.requests] == [w.output_len for w in workload]
    assert not res.stopped_early
    sim.assert_no_leaks()


def test_misprediction_extends_and_preempts_and_still_finishes() -> None:
    opts = {"predictor": "fixed", "predictor_options": {"length": 8}, "margin": 0.0, "preempt_mode": "swap"}
    sim = Simulator(make_policy("ecoserve", **opts), _cluster("ecoserve", 80))
    workload = _random_workload(3, 80, 50.0)
    res = sim.run(workload)
    assert len(res.requests) == 80
    assert res.counters["extensions"] > 0 and res.counters["preemptions"] > 0, res.counters
    sim.assert_no_leaks()


def test_deterministic_for_a_seed() -> None:
    def once() -> list[tuple[float, float, float]]:
        m, res, _ = simulate(Layout("ecoserve", ClusterShape(1, 1, 1, 1)), "opt-13b", make_workload("sharegpt", 300, 8.0, seed=5),
                             SLO(250, 100), policy_options={"predictor": "oracle-noisy"})
        return [(r.ttft_ms, r.tpot_ms, r.e2e_ms) for r in res.requests]

    assert once() == once()


def test_overload_stops_early_and_goodput_brackets_it() -> None:
    search = Search("opt-13b", "sharegpt", SLO(250, 100), num_requests=200, min_duration_s=20)
    lay = Layout("distserve", ClusterShape(1, 1, 1, 1))
    over = search.attainment(lay, 200.0)
    assert over.stopped_early and over.attainment < 0.9
    g, probes = goodput(search, lay, rel_tol=0.1)
    assert 0 < g < 200
    ok = [p for p in probes if p.attainment >= 0.9]
    assert ok and max(p.rate for p in ok) == pytest.approx(g)
    assert all(p.attainment < 0.9 for p in probes if p.rate > g * 1.1 + 1e-9)


@pytest.mark.parametrize(("policy", "rate", "cap"), [("vllm", 6.0, 8), ("distserve", 9.0, 6), ("ecoserve", 9.0, 4)])
def test_min_gpus_finds_the_layout_that_trying_every_layout_fewest_first_finds(policy: str, rate: float, cap: int) -> None:
    search = Search("opt-13b", "sharegpt", SLO(250, 100), num_requests=200, min_duration_s=20)
    every = list(layouts(policy, "opt-13b", cap))
    first = next((x for x in every if search.attainment(x, rate).attainment >= 0.9), None)
    lay, m, probes = min_gpus(search, policy, rate, max_gpus=cap)
    assert first is not None and lay == first
    assert m is not None and m.attainment >= 0.9 and m.layout == first.shape.label
    assert all(p.gpus <= cap for p in probes)
    assert len(probes) < len(every)  # the frontier, not every layout
    assert [x.shape.gpus for x in every] == sorted(x.shape.gpus for x in every)


def test_min_gpus_skips_layouts_a_lower_rate_already_failed() -> None:
    search = Search("opt-13b", "sharegpt", SLO(250, 100), num_requests=200, min_duration_s=20)
    failed: list[Layout] = []
    low, _, _ = min_gpus(search, "distserve", 14.0, max_gpus=6, failed=failed)
    assert low is not None and failed  # something failed on the way
    _, _, probes = min_gpus(search, "distserve", 30.0, max_gpus=6, failed=list(failed))
    tried = {p.layout for p in probes}
    assert not tried & {f.shape.label for f in failed}


@pytest.mark.parametrize("name", WORKLOADS)
def test_workloads_load(name: str) -> None:
    reqs = make_workload(name, 50, 4.0)
    assert len(reqs) == 50 and all(r.prompt_len >= 1 and r.output_len >= 1 for r in reqs)
    assert reqs[-1].arrival_s > 0


def test_azure_keeps_its_own_arrival_times_when_no_rate() -> None:
    reqs = make_workload("azure-conv", 30, None)
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)


def test_sim_command_prints_the_table_and_writes_json(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.json"
    assert main(["sim", "--policy", "ecoserve", "--prefill", "1", "--decode", "1", "--rate", "4", "--num-requests", "100",
                 "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "attain" in text and "TTFT p90" in text and "requests/s" in text
    data = json.loads(out.read_text())
    assert data["metrics"]["finished"] == 100


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sim", "--model", "opt-7b", "--rate", "1"], "unknown model 'opt-7b'"),
        (["sim", "--slo-ttft-ms", "0", "--rate", "1"], "TTFT SLO must be a number of milliseconds > 0"),
        (["sim", "--slo-tpot-ms", "-5", "--rate", "1"], "TPOT SLO must be a number of milliseconds > 0"),
        (["sim", "--tp-decode", "3", "--rate", "1"], "no profile for opt-13b at TP 3"),
        (["sim", "--rate", "-1"], "rate must be > 0"),
        (["sim", "--workload", "sharegpt"], "has no arrival times of its own: give a rate"),
    ],
)
def test_bad_input_is_one_clear_line(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_workload_is_refused_by_argparse(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["sim", "--workload", "lmsys"])
    assert exc.value.code == 2 and "invalid choice: 'lmsys'" in capsys.readouterr().err


def test_profile_file_with_a_missing_coefficient(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"prefill": [1, 2], "decoding_smallbs": [1, 2, 3], "decoding_largebs": [1, 2, 3],
                               "decoding_large_small_bs_threshold": 8, "max_num_tokens": 1000}))
    assert main(["sim", "--model", str(bad), "--rate", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "prefill must be three finite numbers" in err


def test_the_simulator_and_its_commands_import_no_torch() -> None:
    """The simulator is pure Python: `ecoserve sim` and the comparisons start without torch."""
    code = ("import sys; from ecoserve.cli import build_parser; build_parser(); "
            "import ecoserve.sim.simulator, ecoserve.sim.experiment, ecoserve.sim.compare, ecoserve.sim.results; "
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert not loaded, f'torch was imported: {loaded[:3]}'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compare_commands_write_their_tables_json_and_plots(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Both comparisons end to end on a small search: every policy gets a layout that meets the
    goal (GPU count) or a goodput on the GPUs given, the tables name each layout, and the plots
    are written. The policy list is explicit: the default one holds vllm:prefill-priority."""
    common = ["--profile", "opt-13b", "--workload", "sharegpt", "--slo-ttft-ms", "250", "--slo-tpot-ms", "100",
              "--num-requests", "100", "--min-duration-s", "10", "--seeds", "1", "--quiet"]
    assert main(["bench", "compare-distserve", *common, "--rate", "5", "--max-gpus", "4", "--out", str(tmp_path / "d")]) == 0
    doc = json.loads((tmp_path / "d" / "compare_distserve.json").read_text())
    text = capsys.readouterr().out
    for pol in ("ecoserve", "distserve"):
        best = doc["best"][pol]
        assert best["attainment"]["mean"] >= doc["settings"]["goal"] and 1 <= best["gpus"]["mean"] <= 4, best
        assert best["per_seed"][0]["label"] in text
    assert (tmp_path / "d" / "gpus.png").stat().st_size > 0
    assert "fewest GPUs for 5.0 req/s" in text
    assert main(["bench", "compare-vllm", *common, "--gpus", "2", "--points", "2", "--policies", "ecoserve,vllm,orca,distserve",
                 "--out", str(tmp_path / "v")]) == 0
    doc = json.loads((tmp_path / "v" / "compare_vllm.json").read_text())
    assert set(doc["goodput"]) == {"ecoserve", "vllm", "orca", "distserve"}
    assert all(g["mean"] > 0 for g in doc["goodput"].values())
    assert doc["gpus"] == 2 and (tmp_path / "v" / "jct_vs_rate.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "vllm (chunked prefill)" in text
    assert all(ClusterShape(**{k: v for k, v in row.items() if k != "policy"}).label in text for row in doc["layouts"].values())


def test_seeds_give_a_spread_and_the_header_names_n_span_seeds_and_link(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "v"
    assert main(["bench", "compare-vllm", "--policies", "vllm", "--gpus", "1", "--points", "2", "--num-requests", "60",
                 "--min-duration-s", "5", "--seeds", "2", "--seed", "3", "--link-gbs", "10", "--rel-tol", "0.2",
                 "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert ("N >= 60 requests per run, arrivals over >= 5 s (more requests where the rate needs them), seeds 3,4 (2; "
            "figures are mean (min–max) over them), KV link 10 GB/s per GPU") in text
    doc = json.loads((out / "compare_vllm.json").read_text())
    assert doc["settings"]["seeds"] == [3, 4] and doc["settings"]["link_gbs"] == 10
    g = doc["goodput"]["vllm"]
    assert len(g["values"]) == 2 and g["min"] <= g["mean"] <= g["max"] and g["min"] == min(g["values"])
    pt = doc["sweeps"]["vllm"][0]
    assert pt["attainment_range"][0] <= pt["attainment"] <= pt["attainment_range"][1]


def test_the_link_bandwidth_reaches_the_simulator() -> None:
    reqs = make_workload("sharegpt", 40, 2.0, 0)
    lay = Layout("distserve", ClusterShape(1, 1, 1, 1))
    fast, _, _ = simulate(lay, "opt-13b", reqs, SLO(250, 100), hardware(25.0))
    slow, _, _ = simulate(lay, "opt-13b", reqs, SLO(250, 100), hardware(0.05))
    assert slow.jct_ms["mean"] > fast.jct_ms["mean"]
    with pytest.raises(ValueError, match="--link-gbs"):
        hardware(0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "ecoserve", "--decode", "1", "--mixed", "2"], "policy 'ecoserve' cannot run a layout of 1 decode, "
         "2 mixed instances; it accepts prefill+decode instances (--prefill N --decode N) or mixed instances (--mixed N) "
         "or prefill+mixed instances (--prefill N --mixed N)"),
        (["--policy", "vllm", "--prefill", "1", "--decode", "1"], "policy 'vllm' cannot run a layout of 1 prefill, 1 decode "
         "instances; it accepts mixed instances (--mixed N)"),
        (["--policy", "distserve", "--decode", "1", "--mixed", "2"], "policy 'distserve' cannot run a layout of 1 decode, "
         "2 mixed instances; it accepts prefill+decode instances (--prefill N --decode N) or mixed instances (--mixed N)"),
    ],
)
def test_a_layout_the_policy_cannot_run_is_refused_naming_those_it_accepts(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["sim", *argv, "--rate", "1", "--num-requests", "5", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"ecoserve: error: {message}"


@pytest.mark.parametrize(("argv", "label"), [
    (["--policy", "ecoserve"], "1P TP1 : 1D TP1"), (["--policy", "vllm"], "1x TP1"), (["--policy", "distserve"], "1P TP1 : 1D TP1"),
    (["--policy", "distserve", "--mixed", "2"], "2x TP1"), (["--policy", "ecoserve", "--prefill", "2"], "2P TP1 : 1D TP1"),
])
def test_sim_runs_the_layout_asked_for_and_defaults_when_none_is(argv: list[str], label: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.json"
    assert main(["sim", *argv, "--rate", "1", "--num-requests", "5", "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["layout"] == label


@pytest.mark.parametrize("policy", ["ecoserve", "distserve", "vllm", "orca"])
def test_layouts_offer_every_kind_a_policy_accepts_and_nothing_it_refuses(policy: str) -> None:
    found = list(layouts(policy, "opt-13b", 4))
    kinds = {frozenset(r for r in ("prefill", "decode", "mixed") if x.shape.count(r)) for x in found}
    assert kinds == set(make_policy(policy).needs_roles)
    for x in found:
        check(x)  # never a layout the policy refuses
    assert [x.shape.gpus for x in found] == sorted(x.shape.gpus for x in found)
    with pytest.raises(ValueError, match="accepts prefill\\+decode instances"):
        check(Layout("ecoserve", ClusterShape(decode=1, mixed=2)))


def test_a_failed_layout_prunes_only_smaller_layouts_of_its_own_kind() -> None:
    mixed, pd = Layout("distserve", ClusterShape(mixed=4)), Layout("distserve", ClusterShape(1, 1, 1, 1))
    assert not _dominates(mixed, pd) and not _dominates(pd, mixed)
    assert _dominates(mixed, Layout("distserve", ClusterShape(mixed=2)))
    assert not _dominates(mixed, Layout("distserve", ClusterShape(mixed=2, tp_mixed=2)))
    assert _dominates(Layout("distserve", ClusterShape(2, 1, 2, 1)), pd)


def test_policy_specs_parse_into_a_name_and_make_policy_options() -> None:
    assert parse_policy("vllm:prefill-priority") == PolicySpec("vllm", (("mode", "prefill-priority"),))
    assert parse_policy("ecoserve:predictor=histogram:margin=0.2").options == (("predictor", "histogram"), ("margin", 0.2))
    assert policy_label("vllm") == "vllm (chunked prefill)"
    assert policy_label("vllm:prefill-priority") == "vllm (prefill-priority)"
    assert policy_label("orca") == "orca"
    with pytest.raises(ValueError, match="gives 'mode' twice"):
        parse_policy("vllm:chunked:prefill-priority")


def test_vllm_prefill_priority_is_a_row_of_its_own(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "compare-vllm", "--policies", "vllm,vllm:prefill-priority", "--gpus", "1", "--points", "2",
                 "--num-requests", "60", "--min-duration-s", "5", "--seeds", "1", "--rel-tol", "0.2", "--quiet",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "vllm (chunked prefill)" in text and "vllm (prefill-priority)" in text
    doc = json.loads((tmp_path / "compare_vllm.json").read_text())
    assert set(doc["goodput"]) == {"vllm", "vllm:prefill-priority"}


def test_a_layout_is_written_flat_and_read_back() -> None:
    """The JSON outputs (compare-vllm, results) hold a layout as one flat object, as before ClusterShape."""
    lay = Layout("distserve", ClusterShape(2, 1, 1, 2))
    assert lay.row() == {"policy": "distserve", "prefill": 2, "tp_prefill": 1, "decode": 1, "tp_decode": 2,
                         "mixed": 0, "tp_mixed": 1}
    assert Layout.from_row(lay.row()) == lay
    assert lay.shape.label == "2P TP1 : 1D TP2" and lay.shape.gpus == 4


def test_the_clients_max_tokens_is_an_option_of_the_simulator_commands(capsys) -> None:  # type: ignore[no-untyped-def]
    common = ["sim", "--policy", "orca", "--mixed", "1", "--rate", "2", "--num-requests", "30", "--quiet"]
    assert main([*common, "--max-tokens", "trace"]) == 0
    assert "max_tokens trace" in capsys.readouterr().out
    assert main([*common, "--max-tokens", "600"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--max-tokens", "all"])
    assert exit_info.value.code == 2
    assert "must be context, trace or a whole number >= 1, got 'all'" in capsys.readouterr().err


def test_results_quick_names_its_settings_layouts_and_both_vllm_baselines(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`bench results --quick` end to end: the header states N, span, seeds, link and the clients'
    max_tokens; both vllm modes are rows, each also on vLLM's own fits; every row names a layout;
    the predictor table shows over-prediction (extensions, reserved-but-unused KV)."""
    out = tmp_path / "results.md"
    assert main(["bench", "results", "--quick", "--quiet", "--jobs", "2", "--cache-dir", str(tmp_path / "cache"), "--predictors", "oracle,histogram", "--out", str(out)]) == 0
    text = out.read_text()
    assert "N >= 150 requests per run, arrivals over >= 15 s" in text and "KV link 25 GB/s per GPU" in text
    assert "clients' max_tokens the context limit less the prompt" in text
    assert "one fused forward pass" in text
    for label in ("vllm (chunked prefill)", "vllm (prefill-priority)"):
        assert f"| {label} |" in text and f"| {label}, on vLLM's own A100 fits |" in text
    assert "| predictor | goodput (req/s) | preemptions at 0.9x goodput | extensions | KV reserved-but-unused share |" in text
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["settings"]["max_tokens"] == "context" and doc["settings"]["seeds"] == [0]
    assert set(doc["vllm"]["own_fits"]) == {"vllm", "vllm:prefill-priority"}
    # The GPU count across target rates: one row per (setting, units), a plot, the spread of the saving.
    sweep = doc["gpu_count"][0]
    assert sweep["units"] == [1, 2] and len(sweep["rates"]) == 2 and sweep["rates"][0] < sweep["rates"][1]
    assert len(sweep["ecoserve"]) == len(sweep["distserve"]) == 2
    assert "| units | rate (req/s) | EcoServe GPUs (layouts) |" in text and "![GPUs needed against target rate](results_gpus.png)" in text
    assert (tmp_path / "results_gpus.png").stat().st_size > 0
    assert "GPUs saved against DistServe over the" in text and "minimum" in text and "median" in text
    # Where KV binds: every policy on OPT-66B's 4 GPUs, with its preemptions.
    assert set(doc["kv_bound"]["rows"]) == {"ecoserve", "distserve", "vllm", "vllm:prefill-priority", "orca"}
    assert "## Where KV binds (opt-66b on 4 GPUs" in text
    # The ablations run on EcoServe's chosen layout and include the fixed 512-token budget.
    assert doc["ablations_layout"] == doc["vllm"]["layouts"]["ecoserve"]
    assert "| fixed 512-token budget (no SLO-derived budget) |" in text


def test_results_refuses_a_process_count_below_one(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "results", "--quick", "--quiet", "--jobs", "0", "--out", str(tmp_path / "r.md")]) != 0
    assert "--jobs must be >= 1 process, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()

"""`ecoserve bench live-vs-sim`: the three policies on their layouts, live (sim engine: workers
that sleep the profile's step times) and simulated, on one tiny slice; goodput and the rankings
taken alike on both sides. Which policy wins is a benchmark result, not asserted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ecoserve.bench.fidelity import ranking as rk
from ecoserve.bench.fidelity.policies import PAIRS, add_arguments, default_slos, pair_settings
from ecoserve.bench.fidelity.run import add_arguments as add_fidelity_arguments
from ecoserve.bench.fidelity.runs import build_requests, layout, run_sim, settings_from
from ecoserve.cli import main

LAYOUTS = {"ecoserve": "2 mixed", "distserve": "1P+1D", "vllm": "2 mixed"}


@pytest.mark.slow  # three clusters of two sim-engine workers, one after the other: about 45 s on 2 cores
def test_three_policies_run_live_and_simulated_on_their_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "lvs.json", tmp_path / "lvs.png"
    code = main(["bench", "live-vs-sim", "--engine", "sim", "--num-requests", "3", "--rates", "4",
                 "--max-prompt-len", "64", "--max-output-len", "3", "--no-progress", "--out", str(out), "--plot", str(png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Goodput" in printed and "Ranking, best first" in printed
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["all_requests_completed"] is True and s["rates"] == "4" and s["num_requests_per_rate"] == 3
    for policy, want in LAYOUTS.items():
        assert s[f"{policy}_layout"] == want
        for side in rk.SIDES:
            f = doc["figures"][policy]["4"][side]
            assert f["requests"] == f["completed"] == 3 and 0 <= f["attainment"] <= 1
            assert f["ttft_p50_ms"] > 0 and f["jct_p90_ms"] >= f["ttft_p90_ms"] > 0
            assert s[f"{policy}_attainment_{side}_at_4"] == f["attainment"]
            assert s[f"{policy}_goodput_{side}_rps"] == (4.0 if f["attainment"] >= 0.9 else 0.0)
        live = doc["live"][policy]["by_rate"]["4"]
        assert live["serve_summary"]["completed"] == 3
        # Each side ran the layout asked for: two ranks live, KV moved only prefill -> decode.
        roles = ["prefill", "decode"] if policy == "distserve" else ["mixed", "mixed"]
        assert live["sim_roles"] == roles
        assert live["live_ranks"] == [f"{role} rank {r}" for r, role in enumerate(roles)]
        assert (live["kv_sent_bytes"] > 0) == (policy == "distserve")
    assert "--latency-profile" in doc["settings"]["pairs"]["ecoserve"]["server_args"]
    assert s["goodput_ranking_agrees"] == (s["goodput_ranking_live"] == s["goodput_ranking_sim"])
    assert set(s["goodput_ranking_live"].replace(">", "=").replace(" ", "").split("=")) == set(LAYOUTS)
    # The same requests for every pair; the same worker settings.
    assert len(doc["requests"]["4"]) == 3 and doc["settings"]["token_budget"] == 512
    assert png.stat().st_size > 0


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_pairs_share_every_setting_but_policy_and_layout() -> None:
    settings = pair_settings(parse("--num-requests", "5"))
    assert [(s.policy, layout(s)) for s in settings] == [(p, LAYOUTS[p]) for p, *_ in PAIRS]
    shared = {(s.num_blocks, s.token_budget, s.threads, s.block_size, s.max_prompt_len, s.max_output_len, s.profile,
               s.slo_ttft_ms, s.slo_tpot_ms, s.seed) for s in settings}
    assert len(shared) == 1
    assert settings[0].profile == "cpu-smollm2-135m"  # the bundled profile by name: no install path in the JSON
    assert {tuple(build_requests(s)) for s in settings} == {tuple(build_requests(settings[0]))}
    ttft, tpot = default_slos(settings[0])
    assert settings[0].slo_ttft_ms == ttft and settings[0].slo_tpot_ms == tpot  # from the profile, before any run
    given = pair_settings(parse("--slo-ttft-ms", "1500", "--slo-tpot-ms", "120"))
    assert {(s.slo_ttft_ms, s.slo_tpot_ms) for s in given} == {(1500.0, 120.0)}


def test_goodput_and_rankings() -> None:
    assert rk.goodput([0.5, 1, 2], [1.0, 0.9, 0.5], 0.9) == 1 and rk.goodput([0.5, 1], [0.8, 0.2], 0.9) == 0.0
    assert rk.ranking({"a": 1.0, "b": 2.0, "c": 1.0}) == [["b"], ["a", "c"]]
    assert rk.show([["b"], ["a", "c"]]) == "b > a = c"

    def f(att: float) -> rk.Figures:
        return rk.Figures(10, 10, att, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

    c = rk.Comparison([1.0, 2.0], 0.9, {"x": "2 mixed", "y": "1P+1D"}, {
        "x": {1.0: {"live": f(1.0), "sim": f(1.0)}, 2.0: {"live": f(0.5), "sim": f(0.9)}},
        "y": {1.0: {"live": f(0.9), "sim": f(0.8)}, 2.0: {"live": f(0.3), "sim": f(0.2)}},
    })
    s = c.summary()
    assert (s["x_goodput_live_rps"], s["x_goodput_sim_rps"], s["y_goodput_live_rps"], s["y_goodput_sim_rps"]) == (1, 2, 1, 0)
    assert s["goodput_ranking_live"] == "x = y" and s["goodput_ranking_sim"] == "x > y"
    assert s["goodput_ranking_agrees"] is False and s["attainment_ranking_agrees_at_1"] is True
    assert s["attainment_rankings_agree_at_every_rate"] is True


def test_sim_fidelity_takes_mixed_workers_and_vllm() -> None:
    p = argparse.ArgumentParser()
    add_fidelity_arguments(p)
    s = settings_from(p.parse_args(["--policy", "vllm", "--prefill", "0", "--decode", "0", "--mixed", "2",
                                    "--calibrate", "0", "--num-requests", "4", "--max-output-len", "4"]))
    res, sim = run_sim(s, build_requests(s))
    assert [w.role for w in sim.workers] == ["mixed", "mixed"] and len(res.requests) == 4


@pytest.mark.parametrize("argv, message", [
    (("bench", "sim-fidelity", "--policy", "vllm"), "policy 'vllm' cannot run a layout of 1 prefill, 1 decode"),
    (("bench", "sim-fidelity", "--mixed", "2", "--prefill", "0", "--decode", "0"), "--calibrate takes 0"),
    (("bench", "sim-fidelity", "--mixed", "-1"), "--prefill, --decode and --mixed must be >= 0"),
    (("bench", "live-vs-sim", "--goal", "1.5"), "--goal is an SLO attainment in (0, 1]"),
])
def test_bad_settings_are_one_line_errors(argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(argv)) == 2
    assert message in capsys.readouterr().err


def test_bad_rates_name_what_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0,1", "a", "1,1"):
        with pytest.raises(SystemExit):
            main(["bench", "live-vs-sim", "--rates", bad])
        assert "must be distinct rates > 0" in capsys.readouterr().err

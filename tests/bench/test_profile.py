"""`ecoserve profile`: the fit on synthetic data, the grid, a quick real run on tiny-llama whose
file `load_profile` reads back, and the errors a user can make (not a timed test)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ecoserve.latency.fit import (
    DecodeSample, MixedSample, PrefillSample, fit_decode, fit_mixed, fit_prefill, fit_step_model, fitted_profile, make_grid,
)
from ecoserve.cli import main
from ecoserve.latency.profile import load_profile

PREFILL = (12.0, 0.8, 2e-4)  # a, b, c
SMALL, LARGE = (20.0, 0.002, 1.5), (35.0, 0.004, 0.9)  # decode below / at or above batch 32


def prefill_samples(coeffs: tuple[float, float, float], noise: float = 0.0) -> list[PrefillSample]:
    rng = np.random.default_rng(0)
    out = []
    for lens in ([16], [64], [256], [1024], [16] * 64, [64] * 16, [256] * 4, [512, 256, 128, 64]):
        s1, s2 = sum(lens), sum(n * n for n in lens)
        ms = (coeffs[0] + coeffs[1] * s1 + coeffs[2] * s2) * (1 + noise * rng.standard_normal())
        out.append(PrefillSample(len(lens), s1, s2, ms))
    return out


def decode_samples(noise: float = 0.0) -> list[DecodeSample]:
    rng = np.random.default_rng(1)
    out = []
    for batch in (1, 2, 4, 8, 16, 32, 64, 128):
        for ctx in (64, 256, 1024):
            a, b, c = SMALL if batch < 32 else LARGE
            ms = (a + b * batch * ctx + c * batch) * (1 + noise * rng.standard_normal())
            out.append(DecodeSample(batch, batch * ctx, ctx, ms))
    return out


def test_fit_recovers_known_coefficients() -> None:
    fit = fit_prefill(prefill_samples(PREFILL))
    assert fit.coeffs == pytest.approx(PREFILL, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.max_rel_err < 1e-9 and fit.num_samples == 8
    dec = fit_decode(decode_samples())
    assert dec.threshold == 32, "the split that fits best is where the data changes regime"
    assert dec.small.coeffs == pytest.approx(SMALL, rel=1e-6) and dec.large.coeffs == pytest.approx(LARGE, rel=1e-6)
    assert (dec.small.num_samples, dec.large.num_samples) == (15, 9)
    # With 2% noise the fit still lands near the truth, and says how far off it is.
    noisy = fit_prefill(prefill_samples(PREFILL, noise=0.02))
    assert noisy.coeffs[1] == pytest.approx(PREFILL[1], rel=0.1) and 0.0 < noisy.max_rel_err < 0.1
    assert noisy.r2 > 0.99


def test_fit_keeps_coefficients_non_negative_and_threshold_can_be_fixed() -> None:
    # A concave curve: unconstrained least squares would give c < 0; the fit clamps it to 0.
    x = np.array([[1.0, n, n * n] for n in (16, 64, 256, 1024, 2048)])
    ms = 5 + 3 * np.sqrt(x[:, 1])
    assert np.linalg.lstsq(x / ms[:, None], np.ones(5), rcond=None)[0][2] < 0
    fit = fit_step_model(x, ms)
    assert min(fit.coeffs) >= 0 and fit.coeffs[2] == 0.0 and fit.coeffs[1] > 0
    fixed = fit_decode(decode_samples(), threshold=8)
    assert fixed.threshold == 8 and fixed.small.num_samples == 9
    above = fit_decode(decode_samples(), threshold=1000)  # above the grid: one fit serves both sides
    assert above.large.coeffs == above.small.coeffs and above.large.num_samples == 0
    with pytest.raises(ValueError, match=r"--threshold 2 leaves fewer than two measured batch sizes .* one of \[4, 8"):
        fit_decode(decode_samples(), threshold=2)
    with pytest.raises(ValueError, match=">= 3 positive times"):
        fit_step_model(x[:2], ms[:2])


def padded_samples() -> list[DecodeSample]:
    """An engine that pads each batch to its longest sequence: 20 + 0.01·batch·max + 1.5·batch."""
    out = []
    for batch in (1, 2, 4, 8, 16, 32):
        for ctx in (64, 256, 1024):
            for ctxs in ([ctx] * batch, [max(1, ctx * (i + 1) // batch) for i in range(batch)]):
                out.append(DecodeSample(batch, sum(ctxs), max(ctxs), 20 + 0.01 * batch * max(ctxs) + 1.5 * batch))
    return out


def test_decode_fit_takes_the_context_form_that_fits() -> None:
    dec = fit_decode(padded_samples(), threshold=1000)  # above the grid: one fit for every batch
    assert dec.context == "padded" and dec.small.coeffs == pytest.approx((20, 0.01, 1.5), rel=1e-6)
    by_sum = fit_decode(padded_samples(), threshold=1000, context="sum")
    assert by_sum.context == "sum" and by_sum.small.max_rel_err > 0.05 > dec.small.max_rel_err
    # Uniform batches alone (every context the same) cannot tell the forms apart: DistServe's wins.
    assert fit_decode(decode_samples()).context == "sum"
    with pytest.raises(ValueError, match="'sum' or 'padded'"):
        fit_decode(padded_samples(), context="longest")


def test_refit_rewrites_the_fits_from_the_samples_a_profile_holds(tmp_path: Path) -> None:
    src, out = tmp_path / "src.json", tmp_path / "refit.json"
    samples = {"prefill": [vars(s) for s in prefill_samples(PREFILL)], "decode": [vars(s) for s in padded_samples()]}
    src.write_text(json.dumps({"model": "m", "summary": {"run_s": 1.0}, "samples": samples}))
    assert main(["profile", "--refit", str(src), "--out", str(out)]) == 0
    prof, doc = load_profile(str(out)), json.loads(out.read_text())
    assert prof.decode_context == "padded" and prof.decode_small == pytest.approx((20, 0.01, 1.5), rel=1e-6)
    assert prof.prefill == pytest.approx(PREFILL, rel=1e-6)
    assert doc["model"] == "m" and doc["summary"]["run_s"] == 1.0 and doc["summary"]["decode_context"] == "padded"
    assert main(["profile", "--refit", str(src), "--decode-context", "sum", "--out", str(out)]) == 0
    assert load_profile(str(out)).decode_context == "sum"
    assert main(["profile", "--refit", str(tmp_path / "none.json"), "--out", str(out)]) == 2


def mixed_samples(truth: str) -> list[MixedSample]:
    """Steps of a prompt of l tokens with k decodes over ctx keys each, timed by a known form:
    "additive" = prefill step + decode step; "fused" = the same less min(a_p, a_d) = a_p = 12."""
    out = []
    for k in (1, 4, 16, 64):
        for ctx in (64, 1024):
            for n in (16, 256, 1024):
                a, b, c = SMALL if k < 32 else LARGE
                ms = PREFILL[0] + PREFILL[1] * n + PREFILL[2] * n * n + a + b * k * ctx + c * k
                out.append(MixedSample(n, n * n, k, k * ctx, ctx, ms - (PREFILL[0] if truth == "fused" else 0.0)))
    return out


@pytest.mark.parametrize("truth, other", [("fused", "additive"), ("additive", "fused")])
def test_mixed_fit_picks_the_form_that_made_the_steps(truth: str, other: str) -> None:
    prof = fitted_profile("synthetic", fit_prefill(prefill_samples(PREFILL)), fit_decode(decode_samples()))
    fit = fit_mixed(mixed_samples(truth), prof)
    assert fit.form == fit.held_back_winner == truth
    assert (fit.num_samples, fit.num_held_back) == (24, 6), "every 4th step is held back"
    assert fit.held_back[truth].max_abs_pct < 1e-6 and fit.chosen_on[truth].max_abs_pct < 1e-6
    assert fit.held_back[other].mean_abs_pct > 1.0, "the other form is off by the 12 ms fixed cost"
    assert fit_mixed(mixed_samples(truth), prof) == fit, "deterministic"
    with pytest.raises(ValueError, match=">= 4 mixed samples, got 3"):
        fit_mixed(mixed_samples(truth)[:3], prof)


def test_refit_chooses_the_mixed_form_and_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "src.json", tmp_path / "refit.json"
    samples = {"prefill": [vars(s) for s in prefill_samples(PREFILL)], "decode": [vars(s) for s in decode_samples()]}
    # 1. An older profile, no mixed samples: no mixed_form written, and it loads as "fused".
    src.write_text(json.dumps({"model": "m", "samples": samples}))
    assert main(["profile", "--refit", str(src), "--out", str(out)]) == 0
    assert "mixed_form" not in json.loads(out.read_text()) and load_profile(str(out)).mixed_form == "fused"
    # 2. With mixed samples timed additively: the refit says so, in the keys and the summary.
    samples["mixed"] = [vars(s) for s in mixed_samples("additive")]
    src.write_text(json.dumps({"model": "m", "samples": samples}))
    assert main(["profile", "--refit", str(src), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["mixed_form"] == doc["summary"]["mixed_form"] == doc["summary"]["mixed_held_back_winner"] == "additive"
    assert doc["summary"]["mixed_additive_held_back_mean_abs_pct"] == 0.0
    assert doc["summary"]["mixed_fused_held_back_max_abs_pct"] > 1.0
    assert load_profile(str(out)).mixed_form == "additive"
    assert "mixed steps: 18 choose the form, 6 held back" in capsys.readouterr().out
    # 3. The file refits to itself.
    again = tmp_path / "again.json"
    assert main(["profile", "--refit", str(out), "--out", str(again)]) == 0
    assert load_profile(str(again)) == dataclasses.replace(load_profile(str(out)), name="again")


def test_grid_stays_within_the_budget_the_batch_and_the_pool() -> None:
    grid = make_grid(max_len=1024, max_batch=128, capacity=20_000, margin=21)
    assert [16] in grid.prefill and [1024] in grid.prefill and [16] * 64 in grid.prefill
    assert max(sum(p) for p in grid.prefill) == 1024 and max(map(len, grid.prefill)) <= 128
    assert {len(d) for d in grid.decode} == {1, 2, 4, 8, 16, 32, 64, 128}
    assert all(sum(n + 21 for n in d) <= 20_000 for d in grid.decode), "every decode batch fits the pool"
    assert max(max(d) for d in grid.decode) == 1024
    spread = [d for d in grid.decode if len(set(d)) > 1]
    assert spread and all(len(d) >= 4 for d in spread)


def test_missing_coefficient_is_refused(tmp_path: Path) -> None:
    good = {"prefill": [1.0, 0.5, 0.0], "decoding_smallbs": [2.0, 0.0, 1.0], "decoding_largebs": [2.0, 0.0, 1.0],
            "decoding_large_small_bs_threshold": 8, "kv_bytes_per_token": 4096, "source": "ignored"}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(good))
    assert load_profile(str(path)).kv_bytes_per_token == 4096
    assert load_profile("opt-13b-tp1").kv_bytes_per_token is None
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "decoding_largebs"}))
    with pytest.raises(ValueError, match=r"p.json lacks decoding_largebs: it must be a JSON object with prefill"):
        load_profile(str(path))
    path.write_text(json.dumps({**good, "kv_bytes_per_token": 0}))
    with pytest.raises(ValueError, match="kv_bytes_per_token must be an integer >= 1 or absent, got 0"):
        load_profile(str(path))


def test_quick_profile_of_tiny_llama_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "folder" / "tiny.json"  # folders that do not exist yet
    assert main(["profile", "--model", "tiny-llama", "--quick", "--num-blocks", "512", "--out", str(out)]) == 0
    prof = load_profile(str(out))
    assert prof.prefill[1] > 0, "a prefill step costs more with more prompt tokens"
    assert min(prof.prefill + prof.decode_small + prof.decode_large) >= 0
    assert prof.max_num_tokens == 512 * 16 and prof.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # 2 layers, 2 KV heads
    doc = json.loads(out.read_text())
    assert doc["source"].startswith("fitted by `ecoserve profile` on ") and doc["dtype"] == "float32"
    assert doc["decoding_large_small_bs_threshold"] in {s["batch"] for s in doc["samples"]["decode"]}
    for name in ("prefill", "decoding_smallbs", "decoding_largebs"):
        r2, err = doc["summary"][f"{name}_r2"], doc["summary"][f"{name}_max_rel_err"]
        assert math.isfinite(r2) and r2 <= 1.0 and err >= 0
    assert doc["num_samples"]["prefill"] == len(doc["samples"]["prefill"]) >= 6
    assert doc["num_samples"]["mixed"] == len(doc["samples"]["mixed"]) == 18
    assert doc["mixed_form"] in ("fused", "additive") and prof.mixed_form == doc["mixed_form"]
    assert doc["summary"]["mixed_held_back_samples"] == 4
    printed = capsys.readouterr().out
    assert "R²" in printed and f"wrote {out}" in printed and "held back" in printed


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["profile", "--model", "tiny-llama", "--out", str(blocker / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ecoserve: error: cannot write the profile to {blocker / 'p.json'}: ")
    assert err.count("\n") == 1
    assert main(["profile", "--model", "tiny-llama", "--out", str(tmp_path / "p.txt")]) == 2
    assert "--out must name a .json file" in capsys.readouterr().err
    assert main(["profile", "--model", "no-such-model", "--out", str(tmp_path / "p.json")]) == 2
    assert "'no-such-model' is neither a built-in model name nor an existing folder" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists(), "a failed run leaves no file behind"

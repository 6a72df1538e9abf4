"""Training the learned length predictor: the split by conversation, metrics, a small real-data
fit against the baselines, and `ecoserve predictor train` end to end (a word-level stand-in
tokenizer keeps these fast; the real one is SmolLM2's)."""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from ecoserve.predictor.training import train as predictor_train
from ecoserve.predictor.training.data import LengthData, conversation_of, load_length_data, part_of
from ecoserve.predictor.training.metrics import baseline_predictions, fit_baselines, kendall_tau, length_metrics
from ecoserve.predictor.training.train import QUANTILES, TEXT_CANDIDATES, train_text_candidate
from ecoserve.predictor.predictors import PredictionQuery, make_predictor


def word_ids(texts: Sequence[str]) -> list[list[int]]:
    """One id per whitespace-separated word, stable across runs."""
    return [[zlib.crc32(w.encode()) % 49152 for w in t.split()] for t in texts]


def write_sharegpt(path: Path, n: int) -> Path:
    items = []
    for i in range(n):
        for piece in range(1 + i % 3):  # conversations cut into pieces, as in the real file
            turns = [{"from": "human", "value": f"question {i} piece {piece} " + "word " * (i % 7)},
                     {"from": "gpt", "value": "answer " * (1 + i % 11)}]
            items.append({"id": f"conv{i}_{piece}", "conversations": turns})
    path.write_text(json.dumps(items))
    return path


def test_split_is_by_conversation_seeded_and_near_80_10_10() -> None:
    assert conversation_of("hRPPgZT_11") == "hRPPgZT" and conversation_of("abc") == "abc"
    assert conversation_of("a_b") == "a_b", "only a numeric suffix names a piece"
    ids = [f"c{i}" for i in range(20000)]
    parts = [part_of(i) for i in ids]
    shares = [parts.count(p) / len(parts) for p in ("train", "val", "test")]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.01)
    assert parts == [part_of(i, seed=0) for i in ids], "fixed for a seed"
    assert parts != [part_of(i, seed=1) for i in ids], "another seed, another split"
    assert all(part_of(f"{i}_{k}") == part_of(f"{i}_0") for i in ids[:500] for k in (1, 7, 12))


def test_parts_are_disjoint_by_conversation_and_deterministic(tmp_path: Path) -> None:
    file = write_sharegpt(tmp_path / "sg.json", 300)
    data = load_length_data(["train", "val", "test"], word_ids, path=file)
    convs = {p: {conversation_of(i) for i in d.ids} for p, d in data.items()}
    assert not (convs["train"] & convs["val"]) and not (convs["train"] & convs["test"]) and not (convs["val"] & convs["test"])
    assert sum(len(d) for d in data.values()) == sum(1 + i % 3 for i in range(300))
    again = load_length_data(["val"], word_ids, path=file)["val"]
    assert again.ids == data["val"].ids and np.array_equal(again.output_lens, data["val"].output_lens)
    limited = load_length_data(["train"], word_ids, path=file, limit=30)["train"]
    assert set(limited.ids) <= set(data["train"].ids) and len(limited) < 30
    first = data["train"].ids[0]
    assert data["train"].output_lens[0] == 1 + int(first[4:].split("_")[0]) % 11
    with pytest.raises(ValueError, match=r"unknown data part\(s\) \['dev'\]"):
        load_length_data(["dev"], word_ids, path=file)


def test_metrics_on_known_values() -> None:
    assert kendall_tau(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert kendall_tau(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert kendall_tau(np.array([5, 5, 5]), np.array([1, 2, 3])) == 0.0, "a constant predictor ranks nothing"
    m = length_metrics(np.array([100, 100, 100, 100]), np.array([100, 140, 220, 90]), upper=np.array([150, 150, 150, 150]))
    assert m.mae == pytest.approx((0 + 40 + 120 + 10) / 4) and m.within_50 == 0.75 and m.within_100 == 0.75
    assert m.bucket_accuracy == 0.25  # buckets of 100, 140, 220, 90: 128, 160, 224, 96
    assert m.under_rate == 0.25 and m.mean_padding == pytest.approx((50 + 10 + 0 + 60) / 4)


@pytest.fixture(scope="module")
def small_real() -> dict[str, LengthData]:
    return load_length_data(["train", "val"], word_ids, limit=2500)


def test_small_real_fit_beats_the_baselines_on_validation(small_real: dict[str, LengthData]) -> None:
    train, val = small_real["train"], small_real["val"]
    model = train_text_candidate(TEXT_CANDIDATES[0], train, val, seed=0, epochs=10)
    pred = model.predict(val.prompts, val.prompt_lens)
    learned = length_metrics(pred[:, 0], val.output_lens, pred[:, 1])
    base = fit_baselines(train.prompt_lens, train.output_lens.astype(float), QUANTILES)
    for name, (point, upper) in baseline_predictions(base, val.prompt_lens, 0.9).items():
        b = length_metrics(point, val.output_lens, upper)
        assert learned.mae < b.mae, name
        assert learned.kendall_tau > b.kendall_tau + 0.1, name
    assert learned.under_rate == pytest.approx(0.1, abs=0.02), "the 0.9 head is calibrated on validation"


def test_train_command_writes_a_loadable_artifact_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(predictor_train, "smollm2_encoder", lambda: word_ids)
    args = argparse.Namespace(out=str(tmp_path / "p"), limit=1200, seed=0, epochs=3, hidden_states=0, hidden_max_tokens=64)
    assert predictor_train.run_train(args) == 0
    out = capsys.readouterr().out
    assert "baseline: training mean" in out and "chosen:" in out
    report = json.loads((tmp_path / "p" / "train_report.json").read_text())
    chosen = report["summary"]["chosen"]
    assert chosen in {c.name for c in TEXT_CANDIDATES}
    assert {r["name"] for r in report["validation"]} >= {c.name for c in TEXT_CANDIDATES}
    assert sorted(p.name for p in (tmp_path / "p" / "candidates").iterdir()) == sorted(c.name for c in TEXT_CANDIDATES)
    pred = make_predictor("learned", path=str(tmp_path / "p"))
    assert pred.predict(PredictionQuery(3, 500, prompt_token_ids=[1, 2, 3])).length >= 1
    info = json.loads((tmp_path / "p" / "model.json").read_text())["info"]
    assert info["candidate"] == chosen and info["data"]["limit"] == 1200 and "--limit 1200" in info["trained_by"]

"""The learned length predictor: token-id features, the artifact (save, load, no pickle), the
bundled default, its options and errors, and its use by the ecoserve policy."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecoserve.cli import main
from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.request import Request
from ecoserve.params import SamplingParams
from ecoserve.predictor.features import NUM_DENSE, FeatureSpec, hashed_ngrams
from ecoserve.predictor.learned import DEFAULT_DIR, META_FILE, TRAIN_COMMAND, WEIGHTS_FILE, LengthModel, load_length_model
from ecoserve.predictor.predictors import LearnedPredictor, PredictionQuery, make_predictor


def make_model(bits: int = 10, seed: int = 0) -> LengthModel:
    """A small random model whose weights are exactly representable in the artifact (float16)."""
    rng = np.random.default_rng(seed)
    spec = FeatureSpec(bits=bits, max_tokens=16)
    sparse = rng.normal(0, 1, (spec.dim, 2)).astype(np.float16).astype(np.float64)
    dense = np.array([[0.1, 0.1], [0.0, 0.0], [4.0, 4.5]], dtype=np.float32).astype(np.float64)
    return LengthModel(spec, (0.5, 0.9), sparse, dense, np.array([0.0, 0.3]), 4000, {"note": "test"})


def prompts(n: int = 40, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 49152, int(k)).tolist() for k in rng.integers(1, 60, n)]


def test_features_are_unit_rows_of_hashed_ngrams_and_keep_both_ends_of_long_prompts() -> None:
    spec = FeatureSpec(bits=12, max_tokens=8)
    rows = hashed_ngrams([[5, 6, 7], [5, 6, 7], [9]], spec)
    assert rows.num_rows == 3 and np.array_equal(rows.indptr, [0, 5, 10, 11]), "3 unigrams + 2 bigrams"
    norms = np.bincount(rows.row_ids(), weights=rows.values**2)
    assert np.allclose(norms, 1.0)
    assert np.array_equal(rows.indices[:5], rows.indices[5:10]), "the same ids hash to the same slots"
    long = list(range(100, 200))
    clipped = long[:4] + long[-4:]  # the first and last max_tokens // 2
    a, b = hashed_ngrams([long], spec), hashed_ngrams([clipped], spec)
    assert np.array_equal(a.indices, b.indices) and np.allclose(a.values, b.values)
    arrays = hashed_ngrams([np.array(p) for p in prompts()], spec)
    assert np.array_equal(arrays.indices, hashed_ngrams(prompts(), spec).indices), "lists and arrays agree"


def test_artifact_round_trip_predicts_the_same_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    folder = model.save(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == [META_FILE, WEIGHTS_FILE]
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["quantiles"] == [0.5, 0.9] and meta["info"] == {"note": "test"}
    header_len = int.from_bytes((folder / WEIGHTS_FILE).read_bytes()[:8], "little")
    assert json.loads((folder / WEIGHTS_FILE).read_bytes()[8 : 8 + header_len])["sparse"]["dtype"] == "F16"

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading an artifact must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = load_length_model(folder)
    ps = prompts() + [[]]
    assert np.array_equal(loaded.predict(ps), model.predict(ps))
    assert np.allclose([loaded.predict_one(p) for p in ps], loaded.predict(ps), rtol=1e-9), "the one-prompt path agrees"
    assert loaded.quantiles == model.quantiles and loaded.spec == model.spec and loaded.max_length == 4000
    upper = loaded.predict(ps)
    assert np.all(upper[:, 1] >= upper[:, 0]) and np.all((upper >= 1) & (upper <= 4000))


def test_missing_artifact_says_how_to_train_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"lacks model.json.*train one with `{TRAIN_COMMAND}`"):
        make_predictor("learned", path=str(tmp_path / "nowhere"))
    assert TRAIN_COMMAND == "ecoserve predictor train --out DIR"
    (tmp_path / "bad").mkdir()
    make_model().save(tmp_path / "bad")
    meta = json.loads((tmp_path / "bad" / META_FILE).read_text())
    (tmp_path / "bad" / META_FILE).write_text(json.dumps(meta | {"format": "other/9"}))
    with pytest.raises(ValueError, match="has format 'other/9'; this EcoServe reads 'ecoserve-length-model/1'"):
        load_length_model(tmp_path / "bad")


def test_cli_eval_of_a_missing_model_fails_with_the_train_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predictor", "eval", "--model", str(tmp_path / "none")]) == 2
    assert "ecoserve predictor train --out DIR" in capsys.readouterr().err


def test_bundled_model_predicts_from_token_ids_within_max_tokens() -> None:
    assert (DEFAULT_DIR / META_FILE).is_file() and (DEFAULT_DIR / WEIGHTS_FILE).is_file()
    assert sum(p.stat().st_size for p in DEFAULT_DIR.iterdir()) < 2 << 20, "the bundled artifact stays under 2 MB"
    point, padded = make_predictor("learned"), make_predictor("learned", quantile=0.9)
    ids = prompts(20)
    queries = [PredictionQuery(len(p), 2048, prompt_token_ids=p) for p in ids]
    for q in queries:
        a, b = point.predict(q), padded.predict(q)
        assert 1 <= a.length <= b.length <= 2048 and a.bucket >= a.length
    assert point.predict(PredictionQuery(len(ids[0]), 7, prompt_token_ids=ids[0])).length <= 7
    assert isinstance(point, LearnedPredictor)
    assert point.predict_batch(queries) == [point.predict(q) for q in queries]
    with pytest.raises(ValueError, match="needs each request's prompt_token_ids"):
        point.predict(PredictionQuery(10, 256))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantile": 0.7}, r"quantile levels \[0.5, 0.9\], not 0.7"),
        ({"quantile": "high"}, "quantile must be a number"),
        ({"path": 3}, "path must be a folder name"),
        ({"sigma": 1.0}, r"does not take options \['sigma'\]"),
    ],
)
def test_bad_learned_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_predictor("learned", **options)


def test_the_ecoserve_policy_predicts_with_the_learned_model_from_the_prompt(tmp_path: Path) -> None:
    make_model().save(tmp_path / "m")
    policy = make_policy("ecoserve", predictor="learned", predictor_options={"path": str(tmp_path / "m"), "quantile": 0.9})
    expected = make_predictor("learned", path=str(tmp_path / "m"), quantile=0.9)
    for i, ids in enumerate(prompts(5)):
        req = Request(
            request_id=str(i), client=b"c", client_request_id=str(i), prompt_token_ids=ids,
            params=SamplingParams(max_tokens=3000, temperature=0.0), stream=False,
        )
        policy.on_admit(req)
        want = expected.predict(PredictionQuery(len(ids), 3000, prompt_token_ids=ids))
        assert (req.raw_prediction, req.predicted_tokens) == (want.length, want.bucket)


def test_model_shapes_are_checked() -> None:
    m = make_model()
    with pytest.raises(ValueError, match="start at 0.5"):
        LengthModel(m.spec, (0.9,), m.sparse[:, :1], m.dense[:, :1], np.zeros(1), 10)
    with pytest.raises(ValueError, match=rf"dense weights must be \[{NUM_DENSE}, 1 or 2\]"):
        LengthModel(m.spec, m.quantiles, m.sparse, m.dense[:2], m.offsets, 10)

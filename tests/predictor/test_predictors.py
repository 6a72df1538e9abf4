"""Response-length predictors and bucket schemes (pure Python)."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import subprocess
import sys

import pytest

from ecoserve.predictor.buckets import BucketScheme
from ecoserve.predictor.predictors import PREDICTORS, HistogramPredictor, Prediction, PredictionQuery, make_predictor


def test_default_buckets_are_width_32_to_512_then_doubling() -> None:
    b = BucketScheme()
    assert b.bounds[:3] == (32, 64, 96) and 512 in b.bounds and b.bounds[b.bounds.index(512) + 1] == 1024
    assert [b.bucket(n, 4096) for n in (1, 32, 33, 500, 513, 1025)] == [32, 32, 64, 512, 1024, 2048]
    assert b.bucket(200, 100) == 100, "always clipped to max_tokens"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bounds=(64, 32)), "strictly increasing"),
        (dict(bounds=(32, 32)), "strictly increasing"),
        (dict(bounds=(0, 8)), "positive integers"),
        (dict(width=0), "width must be >= 1"),
        (dict(width=32, linear_until=100), "multiple of width"),
    ],
)
def test_bad_bucket_schemes_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BucketScheme(**kwargs)  # type: ignore[arg-type]


def test_oracle_returns_the_true_length_and_needs_it() -> None:
    p = make_predictor("oracle")
    with pytest.raises(ValueError, match="needs each request's true length"):
        p.predict(PredictionQuery(10, 256, request_id="r"))  # nothing bound yet
    p.bind({"r": 70}.get)
    assert p.predict(PredictionQuery(10, 256, request_id="r")).length == 70
    assert p.predict(PredictionQuery(10, 256, request_id="r")).bucket == 96
    assert p.predict(PredictionQuery(10, 50, request_id="r")).length == 50
    with pytest.raises(ValueError, match="needs each request's true length"):
        p.predict(PredictionQuery(10, 256, request_id="unknown"))


def test_only_oracles_take_true_lengths() -> None:
    """A query has no true length, and a predictor that is no oracle refuses a lookup."""
    assert "true_length" not in {f.name for f in dataclasses.fields(PredictionQuery)}
    assert {n for n, cls in PREDICTORS.items() if cls.oracle} == {"oracle", "oracle-noisy"}
    for name in ("fixed", "histogram"):
        with pytest.raises(TypeError, match="no oracle"):
            make_predictor(name).bind({"r": 70}.get)


def test_noisy_oracle_has_the_asked_log_error_and_is_seeded() -> None:
    a, b = make_predictor("oracle-noisy", sigma=0.5, seed=3), make_predictor("oracle-noisy", sigma=0.5, seed=3)
    a.bind({"r": 1000}.get)
    b.bind({"r": 1000}.get)
    q = PredictionQuery(10, 10**6, request_id="r")
    preds = [a.predict(q).length for _ in range(4000)]
    assert preds[:50] == [b.predict(q).length for _ in range(50)]
    logs = [math.log(x / 1000) for x in preds]
    assert abs(statistics.mean(logs)) < 0.05 and abs(statistics.stdev(logs) - 0.5) < 0.05


def test_histogram_predicts_the_quantile_per_prompt_bin_and_learns_online() -> None:
    p = HistogramPredictor(quantile=0.9, min_samples=10)
    q = PredictionQuery(prompt_len=100, max_tokens=2048)
    assert p.predict(q).length == 2048, "nothing observed: reserve max_tokens"
    rng = random.Random(0)
    for _ in range(500):
        p.observe(100, rng.randint(1, 100))  # bin of 65..128
        p.observe(10, rng.randint(400, 500))  # bin of 9..16
    short = p.predict(q).length
    assert 85 <= short <= 95
    assert 485 <= p.predict(PredictionQuery(12, 2048)).length <= 495
    assert p.predict(PredictionQuery(3000, 2048)).length >= 400, "an empty bin falls back to every observation"


def test_histogram_forgets_beyond_its_window() -> None:
    p = HistogramPredictor(quantile=0.5, min_samples=1, window=50)
    for _ in range(50):
        p.observe(8, 1000)
    for _ in range(50):
        p.observe(8, 10)
    assert p.predict(PredictionQuery(8, 4096)).length == 10


def test_unknown_predictor_and_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown predictor 'gpt'; choose one of \['fixed', 'histogram', 'learned', 'oracle', 'oracle-noisy'\]"):
        make_predictor("gpt")
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\]"):
        HistogramPredictor(quantile=0)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        make_predictor("oracle-noisy", sigma=-1)


def test_predictors_import_no_torch() -> None:
    code = "import sys, ecoserve.predictor.predictors; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fixed_predictor_predicts_its_length_clipped_and_bucketed() -> None:
    pred = make_predictor("fixed", length=40)
    assert pred.predict(PredictionQuery(prompt_len=5, max_tokens=1000)) == Prediction(40, 64)
    assert pred.predict(PredictionQuery(prompt_len=5, max_tokens=30)) == Prediction(30, 30)
    with pytest.raises(ValueError, match="whole number >= 1"):
        make_predictor("fixed", length=0)
    with pytest.raises(ValueError, match="does not take options"):
        make_predictor("fixed", sigma=1.0)

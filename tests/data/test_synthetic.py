from __future__ import annotations

import math

import numpy as np
import pytest

from ecoserve.data.synthetic import arrival_times, synthetic_requests, with_arrivals
from ecoserve.data.workload import WorkloadRequest


def _gaps(times: np.ndarray) -> np.ndarray:
    return np.diff(times)


def test_poisson_rate_and_cv_on_a_large_sample() -> None:
    times = arrival_times(50_000, rate=5.0, arrival="poisson", seed=11)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert (len(times) - 1) / times[-1] == pytest.approx(5.0, rel=0.03)
    gaps = _gaps(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_keeps_the_rate_and_sets_the_burstiness(cv: float) -> None:
    gaps = _gaps(arrival_times(50_000, rate=2.0, arrival="gamma", cv=cv, seed=2))
    assert 1.0 / gaps.mean() == pytest.approx(2.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert np.all(arrival_times(10, rate=math.inf) == 0.0)


def test_lognormal_lengths_have_the_requested_mean() -> None:
    requests = synthetic_requests(20_000, rate=10.0, prompt_mean=300, prompt_sigma=0.8,
                                  output_mean=50, output_sigma=0.3, seed=4)
    assert np.mean([r.prompt_len for r in requests]) == pytest.approx(300, rel=0.03)
    assert np.mean([r.output_len for r in requests]) == pytest.approx(50, rel=0.03)
    assert all(r.prompt_len >= 1 and r.output_len >= 1 and r.prompt is None for r in requests)
    assert requests[0].arrival_s == 0.0


def test_zero_sigma_gives_fixed_lengths() -> None:
    requests = synthetic_requests(50, rate=1.0, prompt_mean=64, prompt_sigma=0,
                                  output_mean=16, output_sigma=0)
    assert {(r.prompt_len, r.output_len) for r in requests} == {(64, 16)}


def test_same_seed_same_workload() -> None:
    a = synthetic_requests(200, rate=3.0, arrival="gamma", cv=2.0, seed=9)
    assert a == synthetic_requests(200, rate=3.0, arrival="gamma", cv=2.0, seed=9)
    assert a != synthetic_requests(200, rate=3.0, arrival="gamma", cv=2.0, seed=10)


def test_with_arrivals_retimes_and_keeps_everything_else() -> None:
    base = [WorkloadRequest(0.0, 10 + i, 5, prompt=f"p{i}") for i in range(100)]
    timed = with_arrivals(base, rate=4.0, seed=1)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in timed] == [
        (r.prompt, r.prompt_len, r.output_len) for r in base
    ]
    assert [r.arrival_s for r in timed] == list(arrival_times(100, rate=4.0, seed=1))
    assert with_arrivals([], rate=4.0) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0}, "rate must be > 0"),
        ({"rate": float("nan")}, "rate must be > 0"),
        ({"arrival": "uniform"}, "allowed: poisson, gamma"),
        ({"cv": 2.0}, "arrival='gamma'"),
        ({"arrival": "gamma", "cv": 0.0}, "cv must be"),
        ({"num_requests": 0}, "num_requests"),
        ({"prompt_mean": 0.5}, "prompt_mean"),
        ({"output_sigma": -1.0}, "output_sigma"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"num_requests": 10, "rate": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthetic_requests(**args)  # type: ignore[arg-type]


def test_with_arrivals_validates_even_an_empty_list() -> None:
    with pytest.raises(ValueError, match="allowed: poisson, gamma"):
        with_arrivals([], rate=1.0, arrival="bursty")

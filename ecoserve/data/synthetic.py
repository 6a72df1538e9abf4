"""Synthetic workloads: lognormal prompt/output lengths with Poisson or Gamma arrivals."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from ecoserve.data.workload import WorkloadRequest, check_count, is_int

ARRIVALS = ("poisson", "gamma")


def synthetic_requests(
    num_requests: int,
    rate: float,
    arrival: str = "poisson",
    cv: float = 1.0,
    prompt_mean: float = 256.0,
    prompt_sigma: float = 0.5,
    output_mean: float = 128.0,
    output_sigma: float = 0.5,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """`num_requests` requests with no text, the first at t=0, `rate` per second on average.

    Lengths are lognormal with arithmetic mean `*_mean` tokens and log-space standard deviation
    `*_sigma` (0 gives every request exactly the mean), rounded and at least 1 token.
    """
    check_count("num_requests", num_requests)
    _check_seed(seed)
    _check_lognormal("prompt", prompt_mean, prompt_sigma)
    _check_lognormal("output", output_mean, output_sigma)
    arrivals = arrival_times(num_requests, rate, arrival, cv, seed)
    # One stream per quantity, so changing the length settings never moves the arrival times.
    prompt_rng, output_rng = (np.random.default_rng([seed, k]) for k in (1, 2))
    prompts = _lognormal_lengths(prompt_rng, num_requests, prompt_mean, prompt_sigma)
    outputs = _lognormal_lengths(output_rng, num_requests, output_mean, output_sigma)
    return [
        WorkloadRequest(float(t), int(p), int(o))
        for t, p, o in zip(arrivals, prompts, outputs)
    ]


def with_arrivals(
    requests: Sequence[WorkloadRequest],
    rate: float,
    arrival: str = "poisson",
    cv: float = 1.0,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """Copies of `requests`, in the same order, with fresh arrival times (the first at t=0)."""
    _check_seed(seed)
    _check_arrival(rate, arrival, cv)  # also when `requests` is empty: a bad setting is a bug
    if not requests:
        return []
    times = arrival_times(len(requests), rate, arrival, cv, seed)
    return [dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(requests, times)]


def arrival_times(
    num_requests: int, rate: float, arrival: str = "poisson", cv: float = 1.0, seed: int = 0
) -> np.ndarray:
    """[num_requests] arrival times in seconds, starting at 0, with mean gap 1/`rate`.

    "poisson" draws exponential gaps (coefficient of variation 1, so `cv` must be 1);
    "gamma" draws Gamma gaps with shape 1/cv^2, so cv > 1 is burstier than Poisson and
    cv < 1 smoother. `rate` = inf sends everything at t=0.
    """
    check_count("num_requests", num_requests)
    _check_seed(seed)
    _check_arrival(rate, arrival, cv)
    if math.isinf(rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng([seed, 0])
    n_gaps = num_requests - 1
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n_gaps)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n_gaps)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _check_arrival(rate: float, arrival: str, cv: float) -> None:
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r}; allowed: {', '.join(ARRIVALS)}")
    if not (rate > 0):  # also rejects NaN
        raise ValueError(f"rate must be > 0 requests/s (inf for all at once), got {rate!r}")
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a finite number > 0, got {cv!r}")
    if arrival == "poisson" and cv != 1.0:
        raise ValueError(
            f"cv={cv} has no effect on 'poisson' arrivals (their cv is 1); "
            "use arrival='gamma' for another burstiness"
        )


def _check_seed(seed: int) -> None:
    # numpy's seed sequences take only non-negative integers.
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _check_lognormal(name: str, mean: float, sigma: float) -> None:
    if not (math.isfinite(mean) and mean >= 1):
        raise ValueError(f"{name}_mean must be a finite number >= 1 token, got {mean!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"{name}_sigma must be a finite number >= 0, got {sigma!r}")


def _lognormal_lengths(
    rng: np.random.Generator, n: int, mean: float, sigma: float
) -> np.ndarray:
    # mu chosen so that E[exp(N(mu, sigma^2))] = mean.
    mu = math.log(mean) - sigma**2 / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=n))).astype(np.int64)

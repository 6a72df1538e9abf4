"""The sampler draws from the distribution its parameters name, and stays finite at the extremes.

1. Statistics: many seeded draws from fixed logits per (temperature, top_k, top_p), compared by a
   chi-square goodness-of-fit test with the truncated, tempered softmax computed here in float64
   (top-k first, then top-p over what is left, as vLLM does). Each case fails below
   p = ALPHA = 1e-3, so a correct sampler fails a case with probability 1e-3 and the
   whole grid with at most 8e-3 (the union bound) for an arbitrary seed; with the fixed seed the
   outcome is the same on every run. A token the reference gives no mass is never drawn.
2. Extremes: a client may send any temperature > 0 and any top_p in (0, 1]; no value may produce
   inf/nan probabilities (which killed a worker), and the degenerate ends are the argmax.
"""

from __future__ import annotations

import math

import pytest
import torch

from ecoserve.model.sampling import sample
from ecoserve.params import SamplingParams

ALPHA = 1e-3  # per-case false-alarm rate
DRAWS = 5000  # per case: ~1 s each on one loaded core
# [vocab]: distinct values (no ties at a top-k edge) and three masked tokens, as the sim engine sends.
LOGITS = [3.0, 2.6, 2.3, 2.0, 1.6, 1.3, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -2.0, -math.inf, -math.inf, -math.inf]
CASES = [  # (temperature, top_k, top_p)
    (1.0, -1, 1.0),  # the plain softmax
    (0.5, -1, 1.0),  # sharper
    (2.0, -1, 1.0),  # flatter
    (1.0, 5, 1.0),  # top-k alone
    (1.0, -1, 0.8),  # top-p alone
    (0.7, 8, 0.9),  # both, top-p binding inside top-k
    (2.0, 4, 0.6),  # both, top-p over the renormalised top-k
    (1e308, -1, 1.0),  # past MAX_TEMPERATURE: uniform over the finite logits
]


def reference(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The truncated, tempered softmax in float64 (independent of the sampler's code)."""
    finite = [i for i, x in enumerate(logits) if x != -math.inf]
    top = max(logits)
    scale = min(temperature, 1e30)  # the sampler's documented limit: uniform beyond it
    weight = {i: math.exp((logits[i] - top) / scale) for i in finite}
    order = sorted(finite, key=lambda i: -logits[i])
    kept = order if top_k == -1 else order[:top_k]
    total = sum(weight[i] for i in kept)
    survivors, before = [], 0.0
    for i in kept:  # the smallest prefix whose mass reaches top_p
        if before >= top_p:
            break
        survivors.append(i)
        before += weight[i] / total
        # A cumulative mass this close to top_p would let float32 rounding decide; the grid avoids it.
        assert abs(before - top_p) > 1e-4 or top_p == 1.0, (temperature, top_k, top_p, before)
    mass = sum(weight[i] for i in survivors)
    return [weight[i] / mass if i in survivors else 0.0 for i in range(len(logits))]


def chi_square_p(counts: list[int], probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic's upper-tail p-value and degrees of freedom; bins expected below 5
    draws are pooled into one (the chi-square approximation needs about 5 per bin)."""
    n = sum(counts)
    big = [i for i, q in enumerate(probs) if q * n >= 5]
    small = [i for i, q in enumerate(probs) if 0 < q * n < 5]
    bins = [(counts[i], probs[i] * n) for i in big]
    if small:
        bins.append((sum(counts[i] for i in small), sum(probs[i] for i in small) * n))
    stat = sum((seen - expected) ** 2 / expected for seen, expected in bins)
    dof = len(bins) - 1
    if dof == 0:
        return 1.0, 0
    # Q(dof/2, stat/2), the regularised upper incomplete gamma function, is the chi-square tail.
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return float(p_value), dof


def draw_counts(temperature: float, top_k: int, top_p: float) -> list[int]:
    """How often each token is drawn in DRAWS seeded draws from LOGITS."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(20)
    logits = torch.tensor(LOGITS).expand(DRAWS, -1)  # [draws, vocab]: one generator, sequential draws
    tokens = sample(logits, [params] * DRAWS, [gen] * DRAWS)
    return torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)).tolist()


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
def test_draws_follow_the_truncated_tempered_softmax(temperature: float, top_k: int, top_p: float) -> None:
    probs = reference(LOGITS, temperature, top_k, top_p)
    counts = draw_counts(temperature, top_k, top_p)
    outside = [i for i, c in enumerate(counts) if c and probs[i] == 0.0]
    assert not outside, f"drew tokens {outside} that the reference gives no mass: {counts}"
    p_value, dof = chi_square_p(counts, probs)
    print(f"T={temperature} top_k={top_k} top_p={top_p}: chi-square p={p_value:.3f} ({dof} dof)")
    assert p_value > ALPHA, f"p={p_value:.2e} ({dof} dof): counts {counts} vs expected {[round(q * DRAWS) for q in probs]}"


def test_the_chi_square_check_has_power() -> None:
    """The check above is not vacuous: the same draws fail it against a reference that is wrong by
    a temperature 15% off (p ~ 5e-9 here; 10% off gives ~2e-4), or by one token too many in the
    top-p set."""
    plain = draw_counts(1.0, -1, 1.0)
    assert chi_square_p(plain, reference(LOGITS, 1.0, -1, 1.0))[0] > ALPHA
    assert chi_square_p(plain, reference(LOGITS, 1.15, -1, 1.0))[0] < ALPHA
    nucleus = draw_counts(1.0, -1, 0.8)
    wider = reference(LOGITS, 1.0, -1, 0.85)
    assert sum(q > 0 for q in wider) == sum(q > 0 for q in reference(LOGITS, 1.0, -1, 0.8)) + 1
    assert chi_square_p(nucleus, wider)[0] < ALPHA


@pytest.mark.parametrize("temperature", [5e-324, 1e-30, 1e30, 1e308])
@pytest.mark.parametrize(("top_k", "top_p"), [(-1, 5e-324), (-1, 1.0), (1, 1.0), (2**63 - 1, 0.5)])
def test_extreme_sampling_values_draw_a_valid_token(temperature: float, top_p: float, top_k: int) -> None:
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))  # [num_seqs, vocab]
    logits[1, 32:] = float("-inf")  # masked tokens, as the sim engine sends
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    tokens = sample(logits, [params, params], [None, torch.Generator().manual_seed(1)])
    assert tokens[1] < 32, "a masked token was drawn"
    if temperature < 1e-20 or top_p < 1e-20 or top_k == 1:  # all mass on the best token
        assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_of_tied_maxima_as_argmax_does(dtype: torch.dtype) -> None:
    """Greedy rows: the first index of the largest logit (ties broken low, a NaN counted largest),
    the tokens transformers' and vLLM's argmax pick."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g).to(dtype)
    logits[1, [40, 7, 900]] = 30.0  # a three-way tie: index 7
    logits[2, :] = -1.0  # every logit equal: index 0
    logits[3, [5, 600]] = float("nan")  # NaN: the first NaN, as argmax
    logits[4, 999] = float("inf")
    params = [SamplingParams(temperature=0)] * 6
    got = sample(logits, params, [None] * 6)
    assert got == logits.argmax(dim=-1).tolist()
    assert got[1:5] == [7, 0, 5, 999]

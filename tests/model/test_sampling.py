"""The sampler under extreme but allowed parameters: a client may send any temperature > 0 and
any top_p in (0, 1]; no value may produce inf/nan probabilities (which killed a worker)."""

from __future__ import annotations

import pytest
import torch

from ecoserve.params import SamplingParams
from ecoserve.model.sampling import sample


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-30, 1e-5, 1.0, 1e30, 1e308])
@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [-1, 1, 2**63 - 1])
def test_extreme_sampling_values_draw_a_valid_token(temperature: float, top_p: float, top_k: int) -> None:
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))  # [num_seqs, vocab]
    logits[1, 32:] = float("-inf")  # masked tokens, as the sim engine sends
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    tokens = sample(logits, [params, params], [None, torch.Generator().manual_seed(1)])
    assert tokens[1] < 32, "a masked token was drawn"
    if temperature < 1e-20 or top_p < 1e-20 or top_k == 1:  # all mass on the best token
        assert tokens == logits.argmax(-1).tolist()

"""Our rope frequencies equal transformers' for every supported scaling type."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ecoserve.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_inv_freq_matches_transformers(scaling: dict[str, object] | None) -> None:
    head_dim, theta = 64, 500000.0
    ours = rope_inv_freq(head_dim, theta, scaling)
    params = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=4096, rope_parameters=params)
    kind = params["rope_type"]
    if kind == "default":
        assert torch.equal(ours, 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim)))
        return
    theirs, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")  # type: ignore[index]
    assert torch.equal(ours, theirs)


def test_unsupported_scaling_is_refused() -> None:
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported; supported types"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_rotation_preserves_norm_and_relative_position() -> None:
    cos, sin = rope_cos_sin(rope_inv_freq(16, 10000.0, None), 64)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    def rot(x: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(x, cos[pos : pos + 1], sin[pos : pos + 1])
    assert torch.allclose(rot(q, 5).norm(), q.norm(), atol=1e-5)
    # <R(m) q, R(n) k> depends on m - n only.
    a = (rot(q, 10) * rot(k, 7)).sum()
    b = (rot(q, 33) * rot(k, 30)).sum()
    assert torch.allclose(a, b, atol=1e-4)

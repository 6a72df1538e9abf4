"""bfloat16 on the CPU: the weights prepacked for oneDNN give the very products `F.linear` gives,
so the engine's tokens and logits do not change (only its speed); float32 is never packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecoserve import LLM, SamplingParams
from ecoserve.engine.model_runner import ModelRunner
from ecoserve.model.llama import can_prepack_cpu_bf16, linear, prepack_cpu_weights

pytestmark = pytest.mark.skipif(not can_prepack_cpu_bf16(), reason="this torch build has no oneDNN prepacked linear")


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])  # qwen2: q/k/v bias
def test_every_packed_projection_equals_f_linear_bit_for_bit(model: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ECOSERVE_CPU_PREPACK", "0")
    llm = LLM(model=model, dtype="bfloat16", num_kv_blocks=16, block_size=16)
    net = llm.engine.runner.model  # type: ignore[attr-defined]
    assert prepack_cpu_weights(net) > 0
    layers = [m for m in net.modules() if getattr(m, "packed_weight", None) is not None]
    assert any(getattr(m, "bias", None) is not None for m in layers) == (model == "tiny-qwen2")
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        for rows in (1, 5, 17, 64):
            x = torch.randn(rows, layer.weight.shape[1], generator=gen).to(torch.bfloat16)
            assert torch.equal(linear(x, layer), F.linear(x, layer.weight, getattr(layer, "bias", None)))


def test_the_engine_packs_bf16_only_and_its_tokens_do_not_change(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prompts = [[7 + i] * n for i, n in enumerate((2, 19, 45, 70))]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    packed = LLM(model="tiny-llama", dtype="bfloat16", num_kv_blocks=64, block_size=16)
    runner = packed.engine.runner
    assert isinstance(runner, ModelRunner)
    assert runner.prepacked == 4 * runner.spec.num_layers + 1  # q/k/v, o, gate/up, down per layer; the head
    monkeypatch.setenv("ECOSERVE_CPU_PREPACK", "0")
    plain = LLM(model="tiny-llama", dtype="bfloat16", num_kv_blocks=64, block_size=16)
    assert plain.engine.runner.prepacked == 0  # type: ignore[attr-defined]
    assert [o.token_ids for o in packed.generate(prompts, params)] == [o.token_ids for o in plain.generate(prompts, params)]
    monkeypatch.delenv("ECOSERVE_CPU_PREPACK")
    assert LLM(model="tiny-llama", dtype="float32", num_kv_blocks=16).engine.runner.prepacked == 0  # type: ignore[attr-defined]


def test_a_bad_prepack_switch_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ecoserve import envs

    monkeypatch.setenv("ECOSERVE_CPU_PREPACK", "yes")
    with pytest.raises(ValueError, match="ECOSERVE_CPU_PREPACK must be 0 or 1, got 'yes'"):
        envs.cpu_prepack()

"""Both CPU decode-attention paths of the runner give the same greedy tokens on a ragged batch:
the C kernel reading blocks in place (default where it builds) and the pure-torch gather path
(ECOSERVE_CPU_KERNELS=0, or no C compiler)."""

from __future__ import annotations

import pytest

from ecoserve import LLM, SamplingParams
from ecoserve.engine.model_runner import ModelRunner
from ecoserve.kernels import cpu


@pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_kernel_and_torch_paths_agree(dtype: str) -> None:
    llm = LLM(model="tiny-llama", dtype=dtype, num_kv_blocks=64, block_size=16)
    runner = llm.engine.runner
    assert isinstance(runner, ModelRunner) and runner.use_cpu_kernel
    prompts = [[5 + i] * n for i, n in enumerate((3, 17, 40, 90))]  # contexts across 1-7 blocks
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    with_kernel = [o.token_ids for o in llm.generate(prompts, params)]
    runner.use_cpu_kernel = False
    with_torch = [o.token_ids for o in llm.generate(prompts, params)]
    assert with_kernel == with_torch
    llm.engine.pool.assert_no_leaks()


@pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_bf16_elementwise_kernels_and_torch_ops_agree(model: str) -> None:
    """RMSNorm, RoPE and SiLU-times-up through the bfloat16 C kernels (on by default for a bf16
    model on the CPU) give the torch ops' greedy tokens; float32 never takes them."""
    llm = LLM(model=model, dtype="bfloat16", num_kv_blocks=64, block_size=16)
    runner = llm.engine.runner
    assert isinstance(runner, ModelRunner) and runner.fused_elementwise and runner.model.fused_cpu_bf16
    prompts = [[9 + i] * n for i, n in enumerate((3, 17, 40, 90))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    fused = [o.token_ids for o in llm.generate(prompts, params)]
    runner.model.fused_cpu_bf16 = False
    for layer in runner.model.layers:
        layer.fused_cpu_bf16 = False
    assert [o.token_ids for o in llm.generate(prompts, params)] == fused
    llm.engine.pool.assert_no_leaks()
    f32 = LLM(model=model, dtype="float32", num_kv_blocks=16, block_size=16).engine.runner
    assert isinstance(f32, ModelRunner) and not f32.fused_elementwise and not f32.model.fused_cpu_bf16

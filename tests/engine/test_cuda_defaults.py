"""On CUDA, `LLM(model)` with no dtype or device given runs the CUDA defaults: bfloat16 weights
and KV, the Triton write-KV and paged-decode kernels inside the model. Its logits and greedy
tokens are compared with transformers' own bfloat16 forward on the same GPU (marker `gpu`:
skipped on machines without CUDA, see tests/conftest.py).

The prompts and the batching are test_hf_equivalence's (eight lengths around the block size,
a small token budget, so prompt chunks share steps with other requests' batched decodes); the
rows are recorded as in test_hf_logits and compared teacher-forced: one transformers forward
over each request's final sequence gives the reference row at every position the engine
sampled from, so one near-tie decided differently does not turn every later token into a
"mismatch".
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ecoserve import LLM, SamplingParams
from ecoserve.model.registry import resolve_model
from tests.engine.test_hf_equivalence import BLOCK_SIZE, NEW_TOKENS, make_prompts
from tests.engine.test_hf_logits import Recorder

pytestmark = pytest.mark.gpu

# bfloat16 keeps 8 significant bits, about 2.4 decimal digits: each rounding may move a value
# by up to 2^-8 = 0.4 % of itself. The engine and transformers round at different points (the
# Triton kernels accumulate attention in float32 in another order than SDPA, chunked prefill
# splits the sums, norms and residual adds round where each implementation stores), so their
# hidden states drift apart by a few roundings per layer, and the logits by some percent of
# their scale. The bounds below are in units of the reference row's largest |logit| ("scale").
# The same comparison in bfloat16 on the CPU (`compare_bf16(model, "cpu")`, torch path; not a
# test, it takes minutes) measured, over 256 rows per model:
#   model          max |error| (p50 / p99 / max)   tokens = argmax   disagreements' gap (max)
#   tiny-llama     0.7 % / 1.2 % / 1.6 %           252 / 256         0.5 %
#   tiny-qwen2     1.8 % / 3.6 % / 4.9 %           243 / 256         1.3 %
#   smollm2-135m   1.3 % / 3.1 % / 6.2 %           252 / 256         0.7 %
# LOGIT_RTOL, 12 % (30 bf16 roundings), is twice the worst error seen: room for another rounding
# order, while a real fault (a wrong block or position, a missing scale) moves a logit by about
# its own size. The random tiny models have flat logits (scale 6 to 9), so near-ties are common
# there: AGREEMENT, the share of sampled tokens that must equal transformers' argmax on the same
# prefix, is 90 % (worst seen: 94.9 %), and every disagreement must be a near-tie, transformers'
# own logit for our token within TIE, 4 % (10 roundings, 3x the largest gap seen), of its top.
LOGIT_RTOL = 0.12
AGREEMENT = 0.90
TIE = 0.04


@dataclass
class Bf16Comparison:
    rows: int
    agree: int
    worst_rel: float  # largest |engine - transformers| / max |transformers row|


def compare_bf16(model: str, device: str) -> Bf16Comparison:
    """Generate greedily with `LLM(model)` in bfloat16 on `device`, then compare every sampled
    row with transformers' bfloat16 forward; asserts the bounds above, returns the figures."""
    from transformers import AutoModelForCausalLM

    # On CUDA "auto" must pick bfloat16; on the CPU the default is float32, so ask for bfloat16.
    dtype = "auto" if device == "cuda" else "bfloat16"
    llm = LLM(model=model, dtype=dtype, device="auto" if device == "cuda" else device, block_size=BLOCK_SIZE,
              max_num_batched_tokens=48)
    assert llm.engine.device == device and llm.engine.dtype is torch.bfloat16
    assert llm.engine.runner.kv_cache.dtype is torch.bfloat16 and llm.engine.runner.kv_cache.device.type == device
    if device == "cuda":  # the Triton write-KV and paged-decode kernels, not the torch path
        assert getattr(llm.engine.runner, "use_kernels", False), "on CUDA the model runs the Triton kernels (is triton installed?)"
    prompts = make_prompts(llm)
    recorder = Recorder()
    recorder.wrap(llm)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    llm.engine.pool.assert_no_leaks()
    assert max(recorder.decode_batches) >= 2, "decodes were never batched (the paged decode path)"
    assert recorder.chunked, "no prompt was prefilled in chunks"

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(model)), dtype=torch.bfloat16).to(device).eval()
    rows = agree = 0
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        sequence = prompt + out.token_ids
        with torch.inference_mode():
            ref = hf(torch.tensor([sequence], device=device)).logits[0].float()  # [seq_len, vocab]
        for i, token in enumerate(out.token_ids):
            at = len(prompt) + i  # tokens the row followed
            row, want = recorder.rows[(out.request_id, at)].float(), ref[at - 1]
            scale = float(want.abs().max())
            rel = float((row - want).abs().max()) / scale
            worst = max(worst, rel)
            assert rel < LOGIT_RTOL, f"{model}: prompt {len(prompt)}, token {i}: |logit error| {rel:.1%} of the row's scale"
            assert token == int(row.argmax()), "greedy took the engine row's argmax"
            rows += 1
            if token == int(want.argmax()):
                agree += 1
            else:  # a near-tie: transformers' own logit for our token is within rounding of its top
                gap = float(want.max() - want[token]) / scale
                assert gap < TIE, f"{model}: token {i} of a {len(prompt)}-token prompt is no near-tie ({gap:.1%})"
    print(f"{model} on {device}: {agree}/{rows} tokens agree, max |logit error| {worst:.2%} of the row's scale")
    assert agree >= AGREEMENT * rows, f"{model}: {agree} of {rows} tokens equal transformers' argmax"
    return Bf16Comparison(rows, agree, worst)


@pytest.mark.parametrize(
    "model", ["tiny-llama", "tiny-qwen2", pytest.param("smollm2-135m", marks=pytest.mark.slow)]
)
def test_bf16_engine_on_cuda_matches_transformers_in_bf16(model: str) -> None:
    comparison = compare_bf16(model, "cuda")
    assert comparison.rows == 8 * NEW_TOKENS

"""Greedy tokens from LLM.generate equal transformers' greedy generate, token for token (float32).

Eight prompts of different lengths (1, block_size - 1, block_size, block_size + 1, ...) run
together under continuous batching with a small token budget, so prefill chunks of some
requests share steps with decodes of others.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from ecoserve import LLM, RequestOutput, SamplingParams
from ecoserve.data.sharegpt import iter_sharegpt_conversations
from ecoserve.model.registry import resolve_model

BLOCK_SIZE = 16
PROMPT_LENS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 5, 40, 70, 130]
NEW_TOKENS = 32


def make_prompts(llm: LLM) -> list[list[int]]:
    """Consecutive windows of real ShareGPT text, one per length in PROMPT_LENS.

    Real text matters for the real model: random ids make it repeat one token, and a
    degenerate output would prove little.
    """
    stream: list[int] = []
    for conv in iter_sharegpt_conversations(limit=40):
        stream += llm.tokenizer.encode(" ".join(t.text for t in conv.turns), add_special_tokens=False)
        if len(stream) > 2 * sum(PROMPT_LENS):
            break
    prompts, start = [], 0
    for n in PROMPT_LENS:
        prompts.append(stream[start : start + n])
        start += n + 7
    return prompts


@lru_cache(maxsize=None)
def hf_greedy(model_name: str, prompt: tuple[int, ...], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = _hf_model(model_name)
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=config, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt) :].tolist()


@lru_cache(maxsize=None)
def _hf_model(model_name: str):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_model(model_name)), dtype=torch.float32).eval()


def check_equivalence(model_name: str, **engine_kwargs: int) -> list[RequestOutput]:
    llm = LLM(model=model_name, dtype="float32", block_size=BLOCK_SIZE, **engine_kwargs)  # type: ignore[arg-type]
    prompts = make_prompts(llm)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    distinct: set[int] = set()
    for prompt, out in zip(prompts, outputs):
        expected = hf_greedy(model_name, tuple(prompt), NEW_TOKENS)
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        distinct.update(expected)
    assert len(distinct) > 32, "reference outputs are degenerate; the comparison would prove little"
    llm.engine.pool.assert_no_leaks()
    return outputs


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_match_transformers(model_name: str) -> None:
    # A 48-token budget forces chunked prefill mixed with other requests' decodes.
    check_equivalence(model_name, max_num_batched_tokens=48)


def test_preemption_by_recompute_keeps_tokens() -> None:
    # 24 blocks of 16 cannot hold all eight requests at once: the newest get preempted and
    # recomputed, and the tokens must still match.
    outputs = check_equivalence("tiny-llama", max_num_batched_tokens=64, num_kv_blocks=24)
    assert sum(o.num_preemptions for o in outputs) > 0, "the pool was meant to be too small"


@pytest.mark.slow
def test_smollm2_matches_transformers() -> None:
    check_equivalence("smollm2-135m", max_num_batched_tokens=96)

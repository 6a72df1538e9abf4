"""Every logit row the engine samples from equals transformers' forward pass (float32).

Long prompts (at least 1,024 tokens) and short ones run together under continuous batching
with a token budget well below the longest prompt, so the long ones are prefilled in chunks
beside the short ones' batched decodes; the longest request ends within a few tokens of
max_model_len. For each request, one transformers forward over its whole final sequence
(prompt + generated tokens) gives the reference logits at every position; the engine's row
for the step that produced output token i must match the reference row at position
len(prompt) + i - 1 within ATOL. Greedy decoding keeps both on the same tokens.

The models: tiny-llama (GQA, tied embeddings), tiny-qwen2 (q/k/v biases, untied head, llama3
RoPE), a tiny Mistral built here with a sliding window that max_model_len stays within (the
engine serves Mistral up to its window), and SmolLM2-135M (slow: real weights).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ecoserve import LLM, SamplingParams
from ecoserve.data.sharegpt import iter_sharegpt_conversations
from ecoserve.engine.model_runner import StepInputs
from ecoserve.model.registry import resolve_model

# float32 over a 2,048-token context: chunked prefill and paged decode sum in another order than
# one full forward; the largest difference seen is reported by each test (about 1e-5 here).
ATOL = 1e-4
BLOCK_SIZE = 16
WINDOW = 1536  # the tiny Mistral's sliding window: its max_model_len


@dataclass
class Recorder:
    """Each sampled row's logits, keyed by (request id, number of tokens it followed)."""

    rows: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    decode_batches: list[int] = field(default_factory=list)  # decodes per step, for the shape checks
    chunked: set[str] = field(default_factory=set)  # requests prefilled in more than one chunk

    def wrap(self, llm: LLM) -> None:
        runner = llm.engine.runner
        execute = runner.execute

        def recorded(inputs: StepInputs) -> torch.Tensor:
            logits = execute(inputs)  # [num_sampled, vocab]
            for row, chunk in zip(logits, inputs.sampled):
                self.rows[(chunk.seq.request_id, chunk.seq.num_tokens)] = row.clone()
            self.decode_batches.append(inputs.meta.num_decodes)
            self.chunked.update(c.seq.request_id for c in inputs.chunks
                                if c.num_new_tokens > 1 and c.seq.num_computed_tokens > 0)
            return logits

        runner.execute = recorded  # type: ignore[method-assign]


def token_stream(llm: LLM, n: int) -> list[int]:
    """`n` tokens of real ShareGPT text: real text keeps the real model's outputs varied."""
    stream: list[int] = []
    for conv in iter_sharegpt_conversations(limit=400):
        stream += llm.tokenizer.encode(" ".join(t.text for t in conv.turns), add_special_tokens=False)
        if len(stream) >= n:
            return stream[:n]
    raise AssertionError(f"ShareGPT gave only {len(stream)} tokens, {n} needed")


def compare(model: str | Path, max_model_len: int, jobs: list[tuple[int, int]], budget: int) -> float:
    """Run `jobs` ((prompt length, new tokens)) together; the largest |engine - transformers|
    logit difference over every sampled row, after asserting it is below ATOL."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(model), dtype="float32", block_size=BLOCK_SIZE, max_model_len=max_model_len,
              max_num_batched_tokens=budget, num_kv_blocks=sum(-(-(p + n) // BLOCK_SIZE) for p, n in jobs))
    assert llm.engine.max_model_len == max_model_len
    assert max(p + n for p, n in jobs) >= max_model_len - 8, "the longest context should reach max_model_len"
    stream = token_stream(llm, sum(p for p, _ in jobs) + 7 * len(jobs))
    prompts, at = [], 0
    for p, _ in jobs:
        prompts.append(stream[at:at + p])
        at += p + 7
    recorder = Recorder()
    recorder.wrap(llm)
    outputs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in jobs])
    llm.engine.pool.assert_no_leaks()
    assert max(recorder.decode_batches) >= 2, "decodes were never batched"
    long_ids = {o.request_id for o, (p, _) in zip(outputs, jobs) if p > budget}
    assert long_ids and long_ids <= recorder.chunked, "every long prompt is prefilled in chunks"

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(str(model))), dtype=torch.float32).eval()
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        sequence = prompt + out.token_ids
        with torch.inference_mode():
            ref = hf(torch.tensor([sequence])).logits[0].float()  # [seq_len, vocab]
        for i, token in enumerate(out.token_ids):
            at = len(prompt) + i  # tokens the row followed
            row = recorder.rows[(out.request_id, at)]
            err = float((row - ref[at - 1]).abs().max())
            worst = max(worst, err)
            assert err < ATOL, f"{model}: prompt {len(prompt)}, output token {i}: max |logit error| {err:.2e}"
            assert token == int(row.argmax()), "greedy took the engine row's argmax"
    print(f"{Path(str(model)).name}: max |logit error| {worst:.2e} over {len(recorder.rows)} rows")
    return worst


# (prompt length, new tokens): two long prompts, one ending 2 tokens short of max_model_len,
# and short ones whose decodes batch with the long ones' prefill chunks.
def tiny_jobs(max_model_len: int) -> list[tuple[int, int]]:
    return [(1024, 24), (max_model_len - 26, 24), (40, 48), (7, 48), (130, 40)]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_tiny_model_logits_match_transformers(model: str) -> None:
    compare(model, 2048, tiny_jobs(2048), budget=256)


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Mistral (GQA, untied head, rope theta 1e6) with a sliding window below its
    2,048 positions, built like the registry's tiny models."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from ecoserve.model import registry

    out = tmp_path_factory.mktemp("tiny-mistral")
    config = MistralConfig(
        **registry._TINY_COMMON, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, sliding_window=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    model = AutoModelForCausalLM.from_config(config)  # float32
    registry._randomize_weights(model, seed=2)
    model.save_pretrained(out)
    # The tiny models share SmolLM2's tokenizer: copied from tiny-llama, not re-read from GGUF (~15 s).
    for path in resolve_model("tiny-llama").iterdir():
        if path.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(path, out / path.name)
    return out


def test_tiny_mistral_logits_match_transformers_within_its_window(tiny_mistral: Path) -> None:
    assert LLM(model=str(tiny_mistral), dtype="float32", num_kv_blocks=8).engine.max_model_len == WINDOW
    compare(tiny_mistral, WINDOW, tiny_jobs(WINDOW), budget=256)


@pytest.mark.slow
def test_smollm2_logits_match_transformers() -> None:
    compare("smollm2-135m", 1280, [(1024, 8), (1266, 14), (40, 16)], budget=384)

"""The offline API: bad input is refused with a clear message and changes nothing; sampling
parameters do what they say."""

from __future__ import annotations

import dataclasses

import pytest

from ecoserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny-llama", max_model_len=256, num_kv_blocks=64)


def assert_untouched(llm: LLM) -> None:
    assert not llm.engine.sequences
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_no_leaks()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(top_k=0), "top_k must be -1"),
        (dict(stop_token_ids=(-3,)), "stop_token_ids must be non-negative"),
    ],
)
def test_sampling_params_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [
        ("", 4, "prompt is empty"),
        ([], 4, "prompt is empty"),
        ([5, 49152], 4, r"prompt token ids must be integers in \[0, 49152\)"),
        ([5, -1], 4, r"prompt token ids must be integers in \[0, 49152\)"),
        ([7] * 250, 10, r"prompt \(250 tokens\) \+ max_tokens \(10\) = 260 exceeds the model's context of 256"),
    ],
)
def test_bad_prompts_are_refused_and_change_nothing(llm: LLM, prompt: object, max_tokens: int, message: str) -> None:
    good = [1, 2, 3]
    with pytest.raises(ValueError, match=message):
        # The good prompt comes first: a batch is validated whole before anything is queued.
        llm.generate([good, prompt], SamplingParams(max_tokens=max_tokens))  # type: ignore[list-item]
    assert_untouched(llm)


def test_request_larger_than_the_pool_is_refused() -> None:
    small = LLM(model="tiny-llama", num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="needs more KV blocks than the whole pool holds"):
        small.generate([[1] * 60], SamplingParams(max_tokens=10))
    assert_untouched(small)


def test_params_count_must_match(llm: LLM) -> None:
    with pytest.raises(ValueError, match="got 2 SamplingParams for 3 prompts"):
        llm.generate([[1], [2], [3]], [SamplingParams(), SamplingParams()])
    assert_untouched(llm)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate([[10, 11, 12]], params)[0].token_ids
    batched = llm.generate([[99] * 30, [10, 11, 12], [5, 6]], params)[1].token_ids
    assert alone == batched
    other_seed = llm.generate([[10, 11, 12]], SamplingParams(max_tokens=12, temperature=0.8, seed=99))[0].token_ids
    assert other_seed != alone
    assert_untouched(llm)


def test_top_k_1_is_greedy(llm: LLM) -> None:
    greedy = llm.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    top1 = llm.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=0))[0].token_ids
    assert greedy == top1


def test_stop_token_and_eos(llm: LLM) -> None:
    ref = llm.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop = ref.token_ids[4]
    first = ref.token_ids.index(stop)
    out = llm.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,)))[0]
    assert out.token_ids == ref.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    assert ref.finish_reason == "length" and len(ref.token_ids) == 10


def test_eos_stops_unless_ignored() -> None:
    eng_llm = LLM(model="tiny-llama", num_kv_blocks=16)
    ref = eng_llm.generate([[3, 4]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    # Pretend the model's EOS is the token greedy decoding emits fifth; the random model's real
    # EOS is practically never sampled, and this keeps the test deterministic.
    eos = ref[4]
    eng_llm.engine.spec = dataclasses.replace(eng_llm.engine.spec, eos_token_ids=(eos,))
    stopped = eng_llm.generate([[3, 4]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert stopped.token_ids == ref[: ref.index(eos) + 1]
    assert stopped.finish_reason == "stop"
    ignored = eng_llm.generate([[3, 4]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == ref and ignored.finish_reason == "length"


def test_string_prompt_and_chat_template(llm: LLM) -> None:
    plain = llm.generate("Hello there", SamplingParams(max_tokens=4, temperature=0))[0]
    chat = llm.generate("Hello there", SamplingParams(max_tokens=4, temperature=0), chat=True)[0]
    assert plain.prompt == "Hello there"
    assert len(chat.prompt_token_ids) > len(plain.prompt_token_ids)  # the template wraps it
    assert "im_start" in llm.tokenizer.decode(chat.prompt_token_ids)
    assert isinstance(plain.text, str) and len(plain.token_ids) == 4


def test_tiny_top_p_keeps_only_the_most_likely_token(llm: LLM) -> None:
    greedy = llm.generate([[8, 9, 10]], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    nucleus = llm.generate([[8, 9, 10]], SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3))[0].token_ids
    assert nucleus == greedy

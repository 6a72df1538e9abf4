"""An OpenAI body becomes SamplingParams and an SLO, or a 400 naming the field (no cluster)."""

from __future__ import annotations

import pytest

from ecoserve.openai_api.requests import ApiError, parse
from ecoserve.params import SLO, SamplingParams


def test_a_completion_body_becomes_params_and_slo() -> None:
    req = parse({"model": "m", "prompt": [1, 2, 3], "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5,
                 "top_k": 4, "seed": 3, "stop_token_ids": [9], "ignore_eos": True, "slo_ttft_ms": 250,
                 "slo_tpot_ms": 40, "stream": True, "stream_options": {"include_usage": True}}, chat=False)
    assert req.prompt == [1, 2, 3]
    assert req.params == SamplingParams(max_tokens=7, temperature=0, top_p=0.5, top_k=4, seed=3,
                                        stop_token_ids=(9,), ignore_eos=True)
    assert req.slo == SLO(ttft_ms=250, tpot_ms=40)
    assert req.stream and req.include_usage


def test_stop_is_a_string_or_up_to_four() -> None:
    assert parse({"model": "m", "prompt": "hi", "stop": "\n"}, chat=False).stop == ("\n",)
    assert parse({"model": "m", "prompt": "hi", "stop": ["a", "bc", "a"]}, chat=False).stop == ("a", "bc")
    assert parse({"model": "m", "prompt": "hi", "stop": []}, chat=False).stop == ()
    assert parse({"model": "m", "prompt": "hi", "stop": None}, chat=False).stop == ()


def test_chat_messages_are_kept_for_the_template() -> None:
    req = parse({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, chat=True)
    assert req.prompt == [{"role": "user", "content": "hi"}]
    assert req.params.max_tokens == 16 and req.slo is None


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"n": 2}, "n", "n must be 1"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": ["a", ""]}, "stop", "non-empty strings"),
    ({"stop": 7}, "stop", "a non-empty string or a list"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", "max_completion_tokens must be an integer >= 1"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"top_k": 0}, "top_k", "-1"),
    ({"slo_ttft_ms": 0}, "slo_ttft_ms", "> 0"),
    ({"prompt": ""}, "prompt", "non-empty"),
    ({"model": None}, "model", "GET /v1/models"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
])
def test_refusals_name_the_field_and_what_is_allowed(body: dict[str, object], param: str, says: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse({"model": "m", "prompt": "hello", **body}, chat=False)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert says in caught.value.message


def test_guidellm_bodies_are_accepted() -> None:
    """What guidellm 0.8 sends (its openai_http backend, chat and completions): vLLM's
    `ignore_eos`, `stop: null` and `stream_options.continuous_usage_stats` beside OpenAI's fields.
    continuous_usage_stats is vLLM's; usage comes once, at the end, as include_usage asks."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    chat = parse({"model": "m", "stream": True, "stream_options": options, "max_completion_tokens": 32, "stop": None,
                  "ignore_eos": True, "messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert chat.params == SamplingParams(max_tokens=32, ignore_eos=True)
    assert chat.stream and chat.include_usage and chat.stop == ()
    text = parse({"model": "m", "stream": True, "stream_options": options, "max_tokens": 32, "stop": None,
                  "ignore_eos": True, "prompt": "hello"}, chat=False)
    assert text.params == SamplingParams(max_tokens=32, ignore_eos=True) and text.include_usage

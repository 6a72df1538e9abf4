"""Through the OpenAI API, greedy answers equal the offline engine's (tiny-llama, float32): text
and token-id prompts, chat through the model's template, streamed or not, stop_token_ids, and
stop strings (the engine's text cut before the string)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ecoserve import LLM, SamplingParams
from tests.http.conftest import Server, http_cluster

pytestmark = pytest.mark.timeout(600)

PROMPTS: list[str | list[int]] = ["The capital of France is", [1, 450, 7483, 310, 3444], "Once upon a time", [1, 15043]]
MAX_TOKENS = [12, 7, 20, 5]
QUESTION = "What is the tallest mountain?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with http_cluster(tmp_path_factory.mktemp("tiny"), "tiny-llama", "--dtype", "float32") as s:
        yield s


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny-llama", dtype="float32", device="cpu")


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_completions_equal_the_offline_engine(server: Server, llm: LLM) -> None:
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    for prompt, m in zip(PROMPTS, MAX_TOKENS):
        ref = llm.generate([prompt], greedy(m), use_tqdm=False)[0]
        out = c.completions.create(model=model, prompt=prompt, max_tokens=m, temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
        assert out.usage is not None and out.usage.completion_tokens == len(ref.token_ids) == m
        assert out.usage.prompt_tokens == len(llm.encode_prompt(prompt))
        chunks = list(c.completions.create(model=model, prompt=prompt, max_tokens=m, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks) == ref.text


def test_chat_applies_the_models_template(server: Server, llm: LLM) -> None:
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    ref = llm.generate([QUESTION], greedy(16), use_tqdm=False, chat=True)[0]
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == ref.text
    assert out.usage is not None and out.usage.prompt_tokens == len(llm.encode_prompt(QUESTION, chat=True))


def test_stop_token_ids_finish_with_stop(server: Server, llm: LLM) -> None:
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    full = llm.generate([PROMPTS[2]], greedy(20), use_tqdm=False)[0].token_ids
    stop = full[5]
    ref = llm.generate([PROMPTS[2]], greedy(20, stop_token_ids=(stop,)), use_tqdm=False)[0]
    out = c.completions.create(model=model, prompt=PROMPTS[2], max_tokens=20, temperature=0,
                               extra_body={"ignore_eos": True, "stop_token_ids": [stop]})
    assert out.choices[0].finish_reason == ref.finish_reason == "stop"
    assert out.choices[0].text == ref.text
    assert out.usage is not None and out.usage.completion_tokens == len(ref.token_ids)


def test_stop_strings_cut_the_offline_engines_text(server: Server, llm: LLM) -> None:
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    full = llm.generate([PROMPTS[0]], greedy(20), use_tqdm=False)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    out = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"

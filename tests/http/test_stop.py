"""Stop strings: the scan over streamed text (no cluster), then through the sim cluster's OpenAI
API: the output ends before the stop string, streamed or not, and the request is aborted on the
coordinator once it matched (test_equivalence.py checks the same against real tokens)."""

from __future__ import annotations

import openai
import pytest

from ecoserve.client import Client
from ecoserve.openai_api.stop import StopScan
from tests.http.conftest import API_KEY, Server

pytestmark = pytest.mark.timeout(300)


def scan(pieces: list[str], *stops: str) -> tuple[list[str], bool]:
    s = StopScan(stops)
    out = [s.feed(p) for p in pieces]
    return out + [s.flush()], s.matched


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    # "ab" might begin "abc": held until "x" shows it does not; then "abc" ends the output.
    assert scan(["xx a", "b", "x ab", "c tail"], "abc") == (["xx ", "", "abx ", "", ""], True)


def test_the_earliest_of_several_stop_strings_wins() -> None:
    assert scan(["one two three"], "three", "two") == (["one ", ""], True)
    assert scan(["one t", "wo three"], "three", "wo") == (["one ", "t", ""], True)


def test_without_a_match_everything_is_sent_in_order() -> None:
    out, matched = scan(["he", "ll", "o wor", "ld"], "worlds", "xyz")
    assert "".join(out) == "hello world" and not matched
    assert out[-2:] == ["", "world"]  # "world" might still have become "worlds": held to the end


def test_nothing_after_a_match() -> None:
    s = StopScan(("b",))
    assert (s.feed("ab"), s.feed("cd"), s.flush()) == ("a", "", "")


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def test_stop_strings_end_the_output_and_abort_the_request(sim_server: Server) -> None:
    c = client_for(sim_server)
    model = c.models.list().data[0].id
    prompt = [5, 6, 7]
    full = c.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[10:14]
    expected = text[: text.index(stop)]
    with Client(sim_server.address, timeout=30) as zmq_client:
        before = zmq_client.stats()
        # 1. Not streamed: the text ends before the stop string; the rest of 1900 tokens is never made.
        out = c.completions.create(model=model, prompt=prompt, max_tokens=1900, temperature=0, stop=[stop, "never"],
                                   extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
        assert out.usage is not None and 0 < out.usage.completion_tokens < 24
        after = zmq_client.stats()
        assert after["aborted"] == before["aborted"] + 1 and after["requests_in_flight"] == 0
        # 2. Streamed: the same text, no chunk carries anything past it.
        chunks = list(c.completions.create(model=model, prompt=prompt, max_tokens=1900, temperature=0, stop=stop,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
        pieces = [ch.choices[0].text for ch in chunks if ch.choices]
        assert "".join(pieces) == expected
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
        stats = zmq_client.stats()
        assert stats["aborted"] == before["aborted"] + 2 and stats["requests_in_flight"] == 0
        # 3. Chat: the same rule on the message's content.
        chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=24,
                                         temperature=0, extra_body={"ignore_eos": True})
        content = chat.choices[0].message.content or ""
        cut = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=24,
                                        temperature=0, stop=content[6:9], extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == content[: content.index(content[6:9])]
        assert cut.choices[0].finish_reason == "stop"

"""The OpenAI API of a sim-engine cluster (tokens are the sim's, so only the shapes, counts and
errors are checked here; test_equivalence.py checks real tokens): completions and chat, streamed
and not, usage, every refusal's status and body, and a disconnect that aborts its request."""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from ecoserve.client import Client
from tests.http.conftest import API_KEY, Server

pytestmark = pytest.mark.timeout(300)


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def model_of(server: Server) -> str:
    return client_for(server).models.list().data[0].id


def post(server: Server, path: str, body: object, key: str | None = API_KEY, timeout: float = 60,
         **kw: object) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.base_url + path, json=body, headers=headers, timeout=timeout, **kw)  # type: ignore[arg-type]


def test_models_health_and_version(sim_server: Server) -> None:
    models = client_for(sim_server).models.list().data
    assert len(models) == 1 and models[0].id.startswith("tiny-llama")
    root = sim_server.base_url.removesuffix("/v1")
    assert requests.get(root + "/health", timeout=30).status_code == 200
    assert requests.get(root + "/version", timeout=30).json()["version"]


def test_completion_text_and_token_ids_with_usage(sim_server: Server) -> None:
    c = client_for(sim_server)
    model = model_of(sim_server)
    out = c.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (4, 6, 10)
    text = c.completions.create(model=model, prompt="Hello there", max_tokens=3, seed=1, top_p=0.9,
                                extra_body={"top_k": 5, "ignore_eos": True, "slo_ttft_ms": 5000, "slo_tpot_ms": 500})
    assert text.usage is not None and text.usage.completion_tokens == 3 and text.usage.prompt_tokens > 0


def test_streamed_completion_matches_its_usage(sim_server: Server) -> None:
    c = client_for(sim_server)
    model = model_of(sim_server)
    plain = c.completions.create(model=model, prompt=[1, 2, 3], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(c.completions.create(model=model, prompt=[1, 2, 3], max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()  # type: ignore[union-attr]


def test_chat_streamed_and_not(sim_server: Server) -> None:
    c = client_for(sim_server)
    model = model_of(sim_server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = c.chat.completions.create(model=model, messages=messages, max_completion_tokens=5, temperature=0,  # type: ignore[arg-type]
                                    extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length" and out.usage is not None and out.usage.completion_tokens == 5
    chunks = list(c.chat.completions.create(model=model, messages=messages, max_completion_tokens=5, temperature=0,  # type: ignore[arg-type]
                                            stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def error_of(response: requests.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"n": 2}, "n", "n must be 1"),
    ({"logprobs": 1}, "logprobs", "not supported"),
    ({"stop": ["1", "2", "3", "4", "5"]}, "stop", "at most 4"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": [1, 10**9]}, "prompt", "prompt token ids must be in"),  # the coordinator's bad_request
    ({"max_tokens": 10**7}, "max_tokens", "max_tokens"),  # the coordinator's bad_request
])
def test_bad_requests_get_400_naming_the_field(sim_server: Server, body: dict[str, object], param: str, says: str) -> None:
    r = post(sim_server, "/completions", {"model": model_of(sim_server), "prompt": "hi", **body})
    error = error_of(r)
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param, error
    assert says in str(error["message"]), error


def test_tools_are_refused_on_chat(sim_server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(sim_server).chat.completions.create(
            model=model_of(sim_server), messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert caught.value.status_code == 400 and "tools" in caught.value.message


def test_api_key_model_path_and_body_size(sim_server: Server) -> None:
    model = model_of(sim_server)
    for key in (None, "wrong-key"):
        r = post(sim_server, "/completions", {"model": model, "prompt": "hi"}, key=key)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert requests.get(sim_server.base_url + "/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sim_server.base_url, api_key="nope", max_retries=0).models.list()
    r = post(sim_server, "/completions", {"model": "gpt-nothing", "prompt": "hi"})
    assert r.status_code == 404 and error_of(r)["param"] == "model" and "gpt-nothing" in str(error_of(r)["message"])
    r = post(sim_server, "/nowhere", {})
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = post(sim_server, "/completions", {"model": model, "prompt": "x" * (5 * 1024 * 1024)})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"
    r = requests.post(sim_server.base_url + "/completions", data=b"{not json", timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


def test_a_client_that_leaves_mid_stream_aborts_its_request(sim_server: Server) -> None:
    with Client(sim_server.address, timeout=30) as zmq_client:
        aborted_before = zmq_client.stats()["aborted"]
        body = {"model": model_of(sim_server), "prompt": [1, 2, 3], "max_tokens": 1900, "stream": True,
                "ignore_eos": True}
        with post(sim_server, "/completions", body, stream=True) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert json.loads(first.removeprefix(b"data: "))["choices"][0]["text"] is not None
            assert zmq_client.stats()["requests_in_flight"] == 1
        # The connection is closed: the HTTP process aborts the request on the coordinator.
        deadline = time.monotonic() + 60
        while (stats := zmq_client.stats())["requests_in_flight"] > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["requests_in_flight"] == 0 and stats["aborted"] == aborted_before + 1, stats


def test_a_client_that_leaves_before_its_reply_starts_aborts_its_request(sim_server: Server) -> None:
    """Not streamed, the reply waits for the request's end: a client that gives up first must not
    leave it running to that end (1,900 tokens) with its KV held."""
    with Client(sim_server.address, timeout=30) as zmq_client:
        before = zmq_client.stats()
        body = {"model": model_of(sim_server), "prompt": [1, 2, 3], "max_tokens": 1900, "ignore_eos": True}
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(sim_server, "/completions", body, timeout=1.0)  # the client leaves, its connection closed
        deadline = time.monotonic() + 60
        while (stats := zmq_client.stats())["requests_in_flight"] > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["requests_in_flight"] == 0, stats
        assert stats["aborted"] == before["aborted"] + 1 and stats["finished"] == before["finished"], stats

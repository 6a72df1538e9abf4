"""The app's request path without a cluster: what reaches the ZeroMQ client (params and the
per-request SLO the policy reads), and how a coordinator's refusal becomes an HTTP status."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ecoserve.client import Completion, RequestError
from ecoserve.openai_api.app import _serve, _Shape
from ecoserve.openai_api.requests import ApiError, parse
from ecoserve.params import SLO, SamplingParams


class FakeClient:
    """Records `generate`'s arguments; answers with a fixed completion or raises `error`."""

    def __init__(self, error: RequestError | None = None) -> None:
        self.calls: list[tuple[Any, SamplingParams, SLO | None]] = []
        self.error = error

    async def generate(self, prompt: Any, params: SamplingParams, *, slo: SLO | None = None) -> Completion:
        self.calls.append((prompt, params, slo))
        if self.error is not None:
            raise self.error
        return Completion("r", [5, 6], " ok", "stop", 3, 1.0, 1.0, 2.0, 0.0, 1.0, 0.0)


def test_the_slo_and_params_reach_the_client() -> None:
    fake = FakeClient()
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0, "seed": 7,
            "slo_ttft_ms": 250, "slo_tpot_ms": 40}
    response = asyncio.run(_serve(parse(body, chat=False), fake, "m", _Shape(chat=False)))  # type: ignore[arg-type]
    assert fake.calls == [([1, 2, 3], SamplingParams(max_tokens=2, temperature=0, seed=7), SLO(250, 40))]
    out = json.loads(bytes(response.body))
    assert out["choices"][0] == {"index": 0, "text": " ok", "logprobs": None, "finish_reason": "stop"}
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.mark.parametrize(("code", "status"), [("bad_request", 400), ("over_limit", 429), ("shutting_down", 503),
                                              ("server_unreachable", 503), ("failed", 500)])
def test_coordinator_errors_map_to_statuses(code: str, status: int) -> None:
    fake = FakeClient(RequestError(code, "max_tokens too large: prompt + max_tokens must fit", "r"))
    with pytest.raises(ApiError) as caught:
        asyncio.run(_serve(parse({"model": "m", "prompt": "hi"}, chat=False), fake, "m", _Shape(chat=False)))  # type: ignore[arg-type]
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.param == ("max_tokens" if status == 400 else None)

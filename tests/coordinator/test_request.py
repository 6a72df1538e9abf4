"""The coordinator's Request: keyword-only, one copy of what the client asked for (`params`,
`slo`), and read-only views of the fields policies read most."""

from __future__ import annotations

import dataclasses

import pytest

from ecoserve.coordinator.request import Request
from ecoserve.params import SLO, SamplingParams


def make_request(slo: SLO | None = None) -> Request:
    params = SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=(3, 4), ignore_eos=True)
    return Request(request_id="r", client=b"c", client_request_id="r", prompt_token_ids=[1, 2], params=params,
                   stream=False, slo=slo, arrival=10.0)


def test_request_is_keyword_only() -> None:
    with pytest.raises(TypeError, match="positional"):
        Request("r", b"c", "r", [1, 2], SamplingParams(), False)  # type: ignore[misc]


def test_views_read_through_to_params_and_slo() -> None:
    req = make_request(SLO(ttft_ms=500.0, tpot_ms=50.0))
    assert (req.max_tokens, req.ignore_eos, req.stop_token_ids) == (9, True, (3, 4))
    assert (req.slo_ttft_ms, req.slo_tpot_ms, req.ttft_deadline) == (500.0, 50.0, 10.5)
    names = {f.name for f in dataclasses.fields(Request)}
    assert names.isdisjoint({"max_tokens", "ignore_eos", "stop_token_ids", "slo_ttft_ms", "slo_tpot_ms", "temperature"})
    with pytest.raises(AttributeError):
        req.max_tokens = 3  # type: ignore[misc]


def test_no_slo_means_no_targets() -> None:
    for slo in (None, SLO()):
        req = make_request(slo)
        assert (req.slo_ttft_ms, req.slo_tpot_ms, req.ttft_deadline) == (None, None, 10.0)

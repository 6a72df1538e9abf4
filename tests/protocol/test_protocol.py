"""The wire protocol: every message round-trips; every malformed frame is refused with a
message naming the problem, and nothing else happens."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoserve import protocol as p
from ecoserve.params import SLO, SamplingParams

SAMPLES = [
    p.Hello(protocol_version=p.PROTOCOL_VERSION, client_name="bench"),
    p.AddRequest(
        request_id="r1", prompt="Hi", prompt_token_ids=None,
        params=SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, top_k=-1, seed=None, stop_token_ids=(2,)),
        slo=SLO(ttft_ms=250.0, tpot_ms=None), stream=True,
    ),
    p.AddRequest(
        request_id="r2", prompt=None, prompt_token_ids=[1, 2, 3],
        params=SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, top_k=50, seed=7, ignore_eos=True),
        slo=SLO(ttft_ms=None, tpot_ms=100.0), stream=False,
    ),
    p.AddRequest(
        request_id="r3", prompt=None, prompt_token_ids=[4], params=SamplingParams(), slo=None, stream=False,
    ),
    p.AbortRequest(request_id="r1"),
    p.GetStats(),
    p.HelloReply(
        protocol_version=p.PROTOCOL_VERSION, server_name="ecoserve", model_id="tiny-llama", vocab_size=49152,
        max_model_len=2048, max_prompt_tokens=2047, max_request_tokens=2048,
    ),
    p.TokenDelta(request_id="r1", index=0, token_ids=[5, 6], text=" Paris"),
    p.RequestFinished(
        request_id="r1", token_ids=[5, 6, 2], text=" Paris.", finish_reason="stop", num_prompt_tokens=4, ttft_ms=12.5, tpot_ms=3.0, e2e_ms=18.5,
        queue_ms=1.0, prefill_ms=10.0, transfer_ms=0.5,
    ),
    p.ErrorReply(request_id=None, code="bad_frame", message="frame is not valid MessagePack"),
    p.StatsReply(values={"kv_blocks_free": 100.0, "requests": 3}),
    p.RegisterWorker(
        protocol_version=p.PROTOCOL_VERSION, secret="", rank=1, role="decode", pid=123, num_blocks=64, block_size=16,
        max_num_batched_tokens=512, model_id="tiny-llama", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=16,
        vocab_size=512, max_model_len=2048,
    ),
    p.Heartbeat(rank=0, free_blocks=10, num_running=2, num_waiting=0),
    p.PrefillDone(rank=0, request_id="c1:r1", first_token=7, finish_reason=None),
    p.PrefillDone(rank=0, request_id="c1:r2", first_token=7, finish_reason=None, free_blocks=12),
    p.TokenEvents(
        rank=1, request_ids=["a", "b"], token_ids=[3, 4], finish_reasons=[None, "length"], preempted=["c"], free_blocks=9
    ),
    p.TransferStatus(rank=1, request_id="a", state="done", message=""),
    p.TransferStatus(rank=0, request_id="a", state="timed_out", message="refused", free_blocks=30),
    p.Released(rank=0, request_id="a"),
    p.WorkerStats(rank=0, values={"used_blocks": 0.0}),
    p.WorkerFailed(rank=0, request_id=None, message="out of memory"),
    p.RegisterReply(accepted=False, message="dtype: float32 != bfloat16"),
    p.RunPrefill(
        request_id="a", prompt_token_ids=[1, 2],
        params=SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, seed=None, ignore_eos=True),
        decode_locally=False,
    ),
    p.RunPrefill(
        request_id="retry1:a", prompt_token_ids=[1, 2],
        params=SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, seed=None, ignore_eos=True),
        decode_locally=True, generated_token_ids=[9, 8],
    ),
    p.SendKV(request_id="a", dst_rank=1, seq_no=0, deadline_s=30.0, deadline_at=1.7e9),
    p.ReceiveKV(
        request_id="a", src_rank=0, seq_no=0, deadline_s=30.0, deadline_at=1.7e9, prompt_token_ids=[1, 2], first_token=5,
        params=SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, seed=1, stop_token_ids=(2,)),
        reserve_tokens=40,
    ),
    p.ReceiveKV(
        request_id="retry1:a", src_rank=0, seq_no=3, deadline_s=30.0, deadline_at=1.7e9, prompt_token_ids=[1, 2],
        first_token=5,
        params=SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, seed=1, stop_token_ids=(2,)),
        reserve_tokens=None, generated_token_ids=[7],
    ),
    p.ExtendReservation(request_id="a", reserve_tokens=72),
    p.Preempt(request_id="a", mode="swap"),
    p.Resume(request_id="a", reserve_tokens=None),
    p.Preempted(rank=1, request_id="a", mode="recompute", free_blocks=9),
    p.AbortWork(request_id="a"),
    p.PeerLost(rank=2),
    p.QueryStats(),
    p.Shutdown(),
]


def test_every_message_type_has_a_round_trip_sample() -> None:
    assert {type(m).__name__ for m in SAMPLES} == set(p.MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    assert p.decode(p.encode(message)) == message


def frame(name: str, fields: dict[str, object]) -> bytes:
    return msgpack.packb([name, fields], use_bin_type=True)


def wire_fields(message: object, **overrides: object) -> dict[str, object]:
    """`message`'s fields as they travel (nested dataclasses as maps), with some replaced."""
    fields = msgpack.unpackb(p.encode(message))[1]
    fields.update(overrides)
    return dict(fields)


def add_request_fields(**overrides: object) -> dict[str, object]:
    return wire_fields(SAMPLES[1], **overrides)


def params_fields(message: object = SAMPLES[1], **overrides: object) -> dict[str, object]:
    """The wire map of `message.params`, with some of its fields replaced."""
    fields = dict(wire_fields(message)["params"])  # type: ignore[call-overload]
    fields.update(overrides)
    return fields


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1", "not valid MessagePack"),
        (b"", "not valid MessagePack"),
        (msgpack.packb({"type": "Hello"}), "2-element array"),
        (msgpack.packb(["Hello"]), "2-element array"),
        (frame("Pickle", {}), "unknown message type 'Pickle'; known types"),
        (frame("Hello", {"protocol_version": 1}), r"missing fields \['client_name'\]"),
        (frame("Hello", {"protocol_version": 1, "client_name": "x", "evil": 1}), r"unexpected fields \['evil'\]"),
        (frame("Hello", {"protocol_version": "1", "client_name": "x"}), "Hello.protocol_version: got str '1', expected int"),
        (frame("Hello", {"protocol_version": True, "client_name": "x"}), "expected int"),
        (frame("Hello", {"protocol_version": 1, "client_name": b"x"}), "Hello.client_name: got bytes"),
        (frame("AddRequest", add_request_fields(prompt_token_ids=[1, "2"])), r"AddRequest.prompt_token_ids: got list"),
        (frame("AddRequest", add_request_fields(params=params_fields(temperature=math.nan))),
         "AddRequest.params.temperature: got float nan"),
        (frame("AddRequest", add_request_fields(params=params_fields(max_tokens=2**64 - 1))),
         "AddRequest.params.max_tokens"),
        (frame("StatsReply", {"values": {"a": "b"}}), r"StatsReply.values\['a'\]"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode(data)


RUN_PREFILL = next(m for m in SAMPLES if isinstance(m, p.RunPrefill))
RECEIVE_KV = next(m for m in SAMPLES if isinstance(m, p.ReceiveKV))


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        # a nested field of the wrong type
        ("AddRequest", add_request_fields(params=params_fields(top_k="5")), r"AddRequest.params.top_k: got str '5', expected int"),
        ("AddRequest", add_request_fields(params=params_fields(seed=1.5)), r"AddRequest.params.seed: got float 1.5, expected int \| None"),
        ("AddRequest", add_request_fields(params=params_fields(ignore_eos=1)), r"AddRequest.params.ignore_eos: got int 1, expected bool"),
        ("AddRequest", add_request_fields(params=params_fields(stop_token_ids=[1, True])),
         r"AddRequest.params.stop_token_ids\[1\]: got bool True, expected int"),
        ("AddRequest", add_request_fields(params=params_fields(stop_token_ids=2)), r"AddRequest.params.stop_token_ids: got int 2"),
        ("AddRequest", add_request_fields(params=[8, 0.0]), r"AddRequest.params: got list of 2 items, expected a SamplingParams map"),
        ("AddRequest", add_request_fields(params=None), r"AddRequest.params: got NoneType None, expected a SamplingParams map"),
        ("AddRequest", add_request_fields(slo={"ttft_ms": "fast", "tpot_ms": None}),
         r"AddRequest.slo.ttft_ms: got str 'fast', expected float \| None"),
        ("AddRequest", add_request_fields(slo=5.0), r"AddRequest.slo: got float 5.0, expected SLO \| None"),
        # an unknown or a missing nested key
        ("AddRequest", add_request_fields(params={**params_fields(), "evil": 1}),
         r"AddRequest.params: missing fields \[\], unexpected fields \['evil'\]; expected \['ignore_eos', 'max_tokens'"),
        ("AddRequest", add_request_fields(params={k: v for k, v in params_fields().items() if k != "seed"}),
         r"AddRequest.params: missing fields \['seed'\], unexpected fields \[\]"),
        ("AddRequest", add_request_fields(slo={"ttft_ms": 1.0}), r"AddRequest.slo: missing fields \['tpot_ms'\]"),
        ("AddRequest", add_request_fields(slo={"ttft_ms": 1.0, "tpot_ms": 1.0, "e2e_ms": 1.0}),
         r"AddRequest.slo: missing fields \[\], unexpected fields \['e2e_ms'\]"),
        # a nested value SamplingParams / SLO would refuse: their own checks, their own words
        ("AddRequest", add_request_fields(params=params_fields(max_tokens=0)), r"AddRequest.params: max_tokens must be an integer >= 1, got 0"),
        ("AddRequest", add_request_fields(params=params_fields(temperature=-1.0)), r"AddRequest.params: temperature must be a number >= 0"),
        ("AddRequest", add_request_fields(params=params_fields(top_p=0.0)), r"AddRequest.params: top_p must be in \(0, 1\], got 0.0"),
        ("AddRequest", add_request_fields(params=params_fields(top_p=1.5)), r"AddRequest.params: top_p must be in \(0, 1\], got 1.5"),
        ("AddRequest", add_request_fields(params=params_fields(top_k=0)), r"AddRequest.params: top_k must be -1 \(disabled\) or an integer >= 1"),
        ("AddRequest", add_request_fields(params=params_fields(stop_token_ids=[3, -1])),
         r"AddRequest.params: stop_token_ids must be non-negative integers, got \[3, -1\]"),
        ("AddRequest", add_request_fields(slo={"ttft_ms": -1.0, "tpot_ms": None}),
         r"AddRequest.slo: SLO.ttft_ms: the TTFT SLO must be a number of milliseconds > 0"),
        ("AddRequest", add_request_fields(slo={"ttft_ms": None, "tpot_ms": 0.0}),
         r"AddRequest.slo: SLO.tpot_ms: the TPOT SLO must be a number of milliseconds > 0"),
        # the worker messages carry the same nested params, checked the same way
        ("RunPrefill", wire_fields(RUN_PREFILL, params=params_fields(RUN_PREFILL, top_p=2.0)), r"RunPrefill.params: top_p must be in \(0, 1\]"),
        ("RunPrefill", wire_fields(RUN_PREFILL, params={**params_fields(RUN_PREFILL), "x": 1}),
         r"RunPrefill.params: missing fields \[\], unexpected fields \['x'\]"),
        ("RunPrefill", wire_fields(RUN_PREFILL, params=params_fields(RUN_PREFILL, max_tokens="4")),
         r"RunPrefill.params.max_tokens: got str '4', expected int"),
        ("ReceiveKV", wire_fields(RECEIVE_KV, params=params_fields(RECEIVE_KV, max_tokens=-3)),
         r"ReceiveKV.params: max_tokens must be an integer >= 1, got -3"),
        ("ReceiveKV", wire_fields(RECEIVE_KV, params={k: v for k, v in params_fields(RECEIVE_KV).items() if k != "top_k"}),
         r"ReceiveKV.params: missing fields \['top_k'\]"),
        ("ReceiveKV", wire_fields(RECEIVE_KV, params=params_fields(RECEIVE_KV, seed=p.MAX_INT + 1)),
         r"ReceiveKV.params.seed: got int 9223372036854775808, expected int \| None"),
    ],
)
def test_a_bad_nested_field_is_refused_like_a_bad_flat_one(name: str, fields: dict[str, object], message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode(frame(name, fields))


def test_nested_dataclasses_travel_as_maps_and_come_back_as_objects() -> None:
    message = SAMPLES[1]
    assert isinstance(message, p.AddRequest)
    fields = msgpack.unpackb(p.encode(message))[1]
    assert fields["params"] == {
        "max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": None, "stop_token_ids": [2],
        "ignore_eos": False,
    }
    assert fields["slo"] == {"ttft_ms": 250.0, "tpot_ms": None}
    decoded = p.decode(p.encode(message))
    assert isinstance(decoded.params, SamplingParams) and decoded.params.stop_token_ids == (2,)
    assert isinstance(decoded.slo, SLO) and decoded.slo.ttft_ms == 250.0
    for sample in (RUN_PREFILL, RECEIVE_KV):
        assert isinstance(p.decode(p.encode(sample)).params, SamplingParams)


def test_big_messages_are_keyword_only() -> None:
    for cls in (p.AddRequest, p.RunPrefill, p.ReceiveKV, p.HelloReply, p.RequestFinished, p.RegisterWorker, p.TokenEvents):
        with pytest.raises(TypeError, match="positional"):
            cls(*range(len(dataclasses.fields(cls))))


def test_oversized_frame_is_refused_before_parsing() -> None:
    big = frame("TokenDelta", {"request_id": "r", "index": 0, "token_ids": list(range(2000))})
    with pytest.raises(p.ProtocolError, match=f"frame of {len(big)} bytes exceeds the maximum of 1024 bytes"):
        p.decode(big, max_bytes=1024)


def test_encode_refuses_foreign_objects() -> None:
    @dataclasses.dataclass(frozen=True)
    class Hello:  # same name, not the protocol's class
        protocol_version: int
        client_name: str

    with pytest.raises(TypeError, match="is not a protocol message"):
        p.encode(Hello(1, "x"))


def test_nothing_is_pickled() -> None:
    source = Path(p.__file__).read_text()
    assert "import pickle" not in source and "pickle." not in source and "ext_hook" not in source
    # MessagePack extension types (where a pickle could hide) are refused, not decoded.
    with pytest.raises(p.ProtocolError):
        p.decode(msgpack.packb(["Hello", {"protocol_version": msgpack.ExtType(1, b"x"), "client_name": "x"}]))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        message = p.decode(data)
    except p.ProtocolError:
        return
    assert type(message).__name__ in p.MESSAGE_TYPES


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


# 300: hypothesis spends ~30 ms drawing each of these; test_protocol_fuzz.py covers the same
# ground with 100,000 seeded frames in a few seconds.
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(p.MESSAGE_TYPES)), st.dictionaries(st.text(max_size=16), json_like, max_size=14))
def test_valid_msgpack_of_the_wrong_shape_is_refused_or_valid(name: str, fields: dict[str, object]) -> None:
    try:
        message = p.decode(frame(name, fields))
    except p.ProtocolError:
        return
    assert p.decode(p.encode(message)) == message  # anything accepted is a well-formed message


def test_an_endpoint_refuses_types_it_does_not_take() -> None:
    frame_ = p.encode(p.Shutdown())
    with pytest.raises(p.ProtocolError, match="unknown message type 'Shutdown'; known types: .*AddRequest"):
        p.decode(frame_, allowed=p.CLIENT_TO_COORDINATOR)
    assert p.decode(p.encode(p.GetStats()), allowed=p.CLIENT_TO_COORDINATOR) == p.GetStats()


def test_a_refused_value_names_the_request_its_frame_gave() -> None:
    # The front door answers such a frame with bad_request for that id, as before protocol 4.
    bad = frame("AddRequest", add_request_fields(params=params_fields(temperature=-1.0)))
    with pytest.raises(p.RefusedValue, match="AddRequest.params: temperature") as info:
        p.decode(bad)
    assert info.value.request_id == add_request_fields()["request_id"]
    # A frame broken in its shape is no request at all: no id, a plain ProtocolError.
    with pytest.raises(p.ProtocolError) as shape:
        p.decode(frame("AddRequest", add_request_fields(params=params_fields(max_tokens="4"))))
    assert not isinstance(shape.value, p.RefusedValue)

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

SAMPLES = [
    p.Hello(protocol_version=p.PROTOCOL_VERSION, client_name="bench"),
    p.AddRequest(
        request_id="r1", prompt="Hi", prompt_token_ids=None, max_tokens=8, temperature=0.0, top_p=1.0,
        top_k=-1, seed=None, stop_token_ids=[2], ignore_eos=False, slo_ttft_ms=250.0, slo_tpot_ms=None, stream=True,
    ),
    p.AddRequest(
        request_id="r2", prompt=None, prompt_token_ids=[1, 2, 3], max_tokens=1, temperature=0.7, top_p=0.9,
        top_k=50, seed=7, stop_token_ids=[], ignore_eos=True, slo_ttft_ms=None, slo_tpot_ms=100.0, stream=False,
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
    p.TokenEvents(
        rank=1, request_ids=["a", "b"], token_ids=[3, 4], finish_reasons=[None, "length"], preempted=["c"], free_blocks=9
    ),
    p.TransferStatus(rank=1, request_id="a", state="done", message=""),
    p.Released(rank=0, request_id="a"),
    p.WorkerStats(rank=0, values={"used_blocks": 0.0}),
    p.WorkerFailed(rank=0, request_id=None, message="out of memory"),
    p.RegisterReply(accepted=False, message="dtype: float32 != bfloat16"),
    p.RunPrefill(
        request_id="a", prompt_token_ids=[1, 2], max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, seed=None,
        stop_token_ids=[], ignore_eos=True, decode_locally=False,
    ),
    p.RunPrefill(
        request_id="retry1:a", prompt_token_ids=[1, 2], max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, seed=None,
        stop_token_ids=[], ignore_eos=True, decode_locally=True, generated_token_ids=[9, 8],
    ),
    p.SendKV(request_id="a", dst_rank=1, seq_no=0, deadline_s=30.0),
    p.ReceiveKV(
        request_id="a", src_rank=0, seq_no=0, deadline_s=30.0, prompt_token_ids=[1, 2], first_token=5, max_tokens=4,
        temperature=0.0, top_p=1.0, top_k=-1, seed=1, stop_token_ids=[2], ignore_eos=False, reserve_tokens=40,
    ),
    p.ReceiveKV(
        request_id="retry1:a", src_rank=0, seq_no=3, deadline_s=30.0, prompt_token_ids=[1, 2], first_token=5, max_tokens=4,
        temperature=0.0, top_p=1.0, top_k=-1, seed=1, stop_token_ids=[2], ignore_eos=False, reserve_tokens=None,
        generated_token_ids=[7],
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


def add_request_fields(**overrides: object) -> dict[str, object]:
    fields = {f.name: getattr(SAMPLES[1], f.name) for f in dataclasses.fields(p.AddRequest)}
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
        (frame("AddRequest", add_request_fields(temperature=math.nan)), "AddRequest.temperature: got float nan"),
        (frame("AddRequest", add_request_fields(max_tokens=2**64 - 1)), "AddRequest.max_tokens"),
        (frame("StatsReply", {"values": {"a": "b"}}), r"StatsReply.values\['a'\]"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode(data)


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

"""Every cross-process message: one frozen dataclass each, MessagePack on the wire.

A frame is `msgpack([type_name, {field: value, ...}])`. Decoding checks the frame size, the
type name, the exact field set and every field's type before a message object exists, so
nothing unvalidated reaches a handler. Nothing on any socket is ever unpickled.

Messages are grouped by destination. The runtime adds its worker messages here as it grows.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 2**20  # a 1M-token prompt of ids fits; anything larger is refused
MAX_INT = 2**63 - 1


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text says what was wrong and what is allowed."""


# --- client -> coordinator -----------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """First message on a connection: the versions must match exactly."""

    protocol_version: int
    client_name: str


@dataclass(frozen=True)
class AddRequest:
    """A generation request. Exactly one of `prompt` and `prompt_token_ids` is set."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: list[int]
    ignore_eos: bool
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    stream: bool


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class GetStats:
    pass


# --- coordinator -> client -----------------------------------------------------------------


@dataclass(frozen=True)
class HelloReply:
    protocol_version: int
    server_name: str


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of a streamed request, in order; `index` is the position of the first one."""

    request_id: str
    index: int
    token_ids: list[int]


@dataclass(frozen=True)
class RequestFinished:
    """The one terminal event of a request that completed. Timings are in milliseconds."""

    request_id: str
    token_ids: list[int]
    finish_reason: str
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    queue_ms: float
    prefill_ms: float
    transfer_ms: float


@dataclass(frozen=True)
class ErrorReply:
    """A refusal or a failure; `request_id` is None when the frame itself could not be read."""

    request_id: str | None
    code: str
    message: str


@dataclass(frozen=True)
class StatsReply:
    values: dict[str, float]


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Hello, AddRequest, AbortRequest, GetStats, HelloReply, TokenDelta, RequestFinished, ErrorReply, StatsReply)
}
Message = Union[Hello, AddRequest, AbortRequest, GetStats, HelloReply, TokenDelta, RequestFinished, ErrorReply, StatsReply]


def encode(message: Any) -> bytes:
    """One frame for `message` (a protocol dataclass)."""
    name = type(message).__name__
    if MESSAGE_TYPES.get(name) is not type(message):
        raise TypeError(f"{type(message).__qualname__} is not a protocol message; known: {sorted(MESSAGE_TYPES)}")
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(MESSAGE_TYPES[name])}
    frame = msgpack.packb([name, fields], use_bin_type=True)
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the maximum frame size of {MAX_FRAME_BYTES} bytes")
    return frame


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """The validated message in `frame`, or ProtocolError naming the problem."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the maximum of {max_bytes} bytes")
    try:
        payload = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"frame is not valid MessagePack ({type(exc).__name__})") from None
    if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], str) and isinstance(payload[1], dict)):
        raise ProtocolError("a frame must be a 2-element array [message type name, {field: value}]")
    name, fields = payload
    cls = MESSAGE_TYPES.get(name)
    if cls is None:
        raise ProtocolError(f"unknown message type {name[:64]!r}; known types: {sorted(MESSAGE_TYPES)}")
    hints = _hints(cls)
    missing = sorted(set(hints) - set(fields))
    extra = sorted(str(k)[:64] for k in set(fields) - set(hints))
    if missing or extra:
        raise ProtocolError(f"{name}: missing fields {missing}, unexpected fields {extra}; expected {sorted(hints)}")
    for field_name, hint in hints.items():
        _check(f"{name}.{field_name}", fields[field_name], hint)
    return cls(**fields)  # type: ignore[no-any-return]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check(path: str, value: Any, hint: Any) -> None:
    """Raise ProtocolError unless `value` has type `hint` (the subset of types messages use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                _check(path, value, option)
                return
            except ProtocolError:
                continue
        raise ProtocolError(f"{path}: got {_describe(value)}, expected {_name(hint)}")
    if hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and -MAX_INT - 1 <= value <= MAX_INT
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: got {_describe(value)}, expected {_name(hint)}")
        for i, item in enumerate(value):
            _check(f"{path}[{i}]", item, args[0])
        return
    elif origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: got {_describe(value)}, expected {_name(hint)}")
        for key, item in value.items():
            _check(f"{path} key", key, args[0])
            _check(f"{path}[{str(key)[:32]!r}]", item, args[1])
        return
    else:
        raise TypeError(f"protocol type {hint!r} at {path} has no validator")
    if not ok:
        raise ProtocolError(f"{path}: got {_describe(value)}, expected {_name(hint)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")

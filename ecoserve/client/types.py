"""What the client returns and raises, and how a call's arguments become an `AddRequest`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ecoserve import protocol
from ecoserve.params import SLO, SamplingParams


@dataclass(frozen=True)
class Delta:
    """New tokens of a streamed request; `index` is the output position of the first one.

    Concatenating every delta's `text` gives the final text (split characters are held back).
    """

    request_id: str
    index: int
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Completion:
    """A finished request (the coordinator's `RequestFinished`).

    finish_reason: "stop" (EOS or a stop token), "length" (max_tokens) or "abort" (aborted by
    this client). Timings are milliseconds measured by the coordinator from the request's
    arrival; a phase the request never reached reports 0.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    queue_ms: float
    prefill_ms: float
    transfer_ms: float

    @classmethod
    def from_message(cls, message: protocol.RequestFinished) -> Completion:
        return cls(**dataclasses.asdict(message))


@dataclass(frozen=True)
class ServerInfo:
    """What the server said about itself in the handshake (`HelloReply`).

    The limits are 0 when the client connected before every worker had registered.
    """

    server_name: str
    model_id: str
    vocab_size: int  # prompt token ids must be in [0, vocab_size)
    max_model_len: int  # prompt + max_tokens may not exceed this
    max_prompt_tokens: int  # the longest prompt accepted
    max_request_tokens: int  # prompt + max_tokens must also fit one worker's whole KV pool

    @classmethod
    def from_message(cls, message: protocol.HelloReply) -> ServerInfo:
        fields = dataclasses.asdict(message)
        del fields["protocol_version"]
        return cls(**fields)


class RequestError(Exception):
    """The server refused or failed a request.

    `code` is the server's `ErrorReply.code` ("bad_request", "failed", "version",
    "unknown_request", "shutting_down", "bad_frame"), or the client's own "server_unreachable"
    (the server's connection closed, or it sent not even a heartbeat reply for the client's
    `heartbeat_timeout`); `request_id` is None for an error that concerns the connection rather
    than one request.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        where = f", request {self.request_id}" if self.request_id is not None else ""
        return f"{self.message} (code {self.code!r}{where})"

    def __reduce__(self) -> tuple[type[RequestError], tuple[str, str, str | None]]:
        return (type(self), (self.code, self.message, self.request_id))


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_timeout(name: str, timeout: float | None) -> None:
    if timeout is None:
        return
    if not _positive_number(timeout):
        raise ValueError(f"{name} must be a finite number of seconds > 0, or None to wait forever; got {timeout!r}")


def make_add_request(
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams | None,
    slo: SLO | None,
    stream: bool,
) -> protocol.AddRequest:
    """The wire message for one call; the values are checked here so a mistake fails in the caller."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be an ecoserve.SamplingParams or None, got {type(params).__name__}")
    if slo is not None and not isinstance(slo, SLO):
        raise TypeError(f"slo must be an ecoserve.client.SLO or None, got {type(slo).__name__}")
    text: str | None = None
    ids: list[int] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"prompt token ids must be non-negative integers, got {ids[:8]!r}...")
    else:
        raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt is empty; give a non-empty string or a non-empty list of token ids")
    return protocol.AddRequest(
        request_id=request_id, prompt=text, prompt_token_ids=ids, params=params, slo=slo, stream=stream,
    )

"""The front door's request handling: tokenise, validate an AddRequest into a Request, and turn
output tokens back into text as they stream. No sockets here; server.py owns those."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ecoserve import protocol as p
from ecoserve.coordinator.request import Request

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_TOKEN_IDS = 1024  # each is checked after every sampled token


class BadRequest(ValueError):
    """A request the server will not accept; the text says what was wrong and what is allowed."""


@dataclass(frozen=True)
class Limits:
    """What the cluster can hold, from the registered workers."""

    vocab_size: int
    max_model_len: int
    max_prompt_tokens: int
    max_request_blocks: int  # blocks of the smallest pool a request must fit in whole
    block_size: int


class TextCodec:
    """The model's tokenizer (tokenizer.json via `tokenizers`: no torch in the coordinator)."""

    def __init__(self, model_folder: Path) -> None:
        path = Path(model_folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the coordinator needs the model's tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def new_text(self, req: Request) -> str:
        """Text of `req`'s output not yet streamed; an incomplete UTF-8 character waits."""
        text = self.decode(req.output_token_ids)
        if text.endswith("\ufffd") or not text.startswith(req.text_sent):
            return ""
        delta = text[len(req.text_sent):]
        req.text_sent = text
        return delta


def build_request(
    msg: p.AddRequest, client: bytes, request_id: str, limits: Limits, codec: TextCodec
) -> Request:
    """A Request from `msg`, or BadRequest naming the first problem. Nothing is queued here."""
    if not msg.request_id or len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise BadRequest(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} characters, got {len(msg.request_id)}")
    if (msg.prompt is None) == (msg.prompt_token_ids is None):
        raise BadRequest("give exactly one of prompt (text) and prompt_token_ids")
    # msg.params and msg.slo passed their own value checks when the frame was decoded.
    params = msg.params
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise BadRequest(f"stop_token_ids has {len(params.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
    if msg.prompt is not None:
        if not msg.prompt:
            raise BadRequest("prompt is empty: give at least one character")
        if len(msg.prompt) > 64 * limits.max_prompt_tokens:  # cheap bound before tokenising
            raise BadRequest(f"prompt of {len(msg.prompt)} characters is far over the {limits.max_prompt_tokens}-token limit")
        prompt = codec.encode(msg.prompt)
        if not prompt:
            raise BadRequest("prompt tokenises to nothing: give some text")
    else:
        prompt = list(msg.prompt_token_ids or [])
        if not prompt:
            raise BadRequest("prompt_token_ids is empty: give at least one token")
    _check_size(len(prompt), params.max_tokens, limits)  # before any per-token work
    if msg.prompt is None and not (0 <= min(prompt) and max(prompt) < limits.vocab_size):
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
        raise BadRequest(f"prompt token ids must be in [0, {limits.vocab_size}); got {bad[:5]}")
    bad_stop = [t for t in params.stop_token_ids if t >= limits.vocab_size]
    if bad_stop:
        raise BadRequest(f"stop_token_ids must be in [0, {limits.vocab_size}); got {bad_stop[:5]}")
    return Request(
        request_id=request_id, client=client, client_request_id=msg.request_id, prompt_token_ids=prompt,
        params=params, stream=msg.stream, slo=msg.slo,
    )


def _check_size(prompt: int, max_tokens: int, limits: Limits) -> None:
    if prompt > limits.max_prompt_tokens:
        raise BadRequest(f"prompt has {prompt} tokens; the limit is {limits.max_prompt_tokens}")
    total = prompt + max_tokens
    if total > limits.max_model_len:
        raise BadRequest(
            f"prompt ({prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's context of "
            f"{limits.max_model_len} tokens; shorten the prompt or lower max_tokens"
        )
    blocks = -(-total // limits.block_size)
    if blocks > limits.max_request_blocks:
        raise BadRequest(
            f"prompt + max_tokens = {total} tokens needs {blocks} KV blocks, more than a worker's whole pool "
            f"({limits.max_request_blocks} blocks of {limits.block_size}); lower max_tokens or start workers with more KV"
        )

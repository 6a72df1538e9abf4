"""Response-length predictors (no torch): one interface, `predict(query) -> Prediction`, and
`observe(prompt_len, output_len)` for those that learn online as requests finish.

- `oracle`: the true length (simulations and upper bounds).
- `oracle-noisy`: the true length times a log-normal error exp(N(0, sigma^2)), seeded.

Only these two ever see a true length, and not through their query: they declare `oracle =
True`, and whoever knows lengths in advance (the coordinator's `Lifecycle.true_length`: a
live request with `ignore_eos` and no stop tokens, or the simulator's trace) binds a lookup by
request id to them (`bind`). No `PredictionQuery` and no `Request` carries one, so no other
predictor and no policy can read it.
- `fixed`: the same `length` for every request (tests; forcing under- or over-prediction).
- `histogram`: per prompt-length bin (powers of two), a chosen quantile of the output lengths
  observed so far in that bin; a bin with fewer than `min_samples` falls back to all bins,
  and with nothing observed yet, to `max_tokens` (the safe side for a reservation).
- `learned`: a length model trained on ShareGPT (learned.py) reading the prompt's token ids;
  `quantile` picks its point prediction (0.5) or a calibrated upper quantile (padding), and
  `path` a trained artifact folder instead of the bundled one.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from ecoserve.predictor.buckets import BucketScheme
from ecoserve.predictor.learned import load_length_model


# request id -> its output length when known before it runs (None: not known). Bound to oracles only.
TrueLengths = Callable[[str], Optional[int]]


@dataclass(frozen=True)
class PredictionQuery:
    """What a client's request tells a predictor: no true length (oracles look theirs up)."""

    prompt_len: int
    max_tokens: int  # the client's cap
    prompt_token_ids: Sequence[int] | None = None  # the prompt itself (the learned predictor reads it)
    request_id: str = ""  # the key an oracle's bound lookup takes


@dataclass(frozen=True)
class Prediction:
    length: int  # predicted output tokens, in [1, max_tokens]
    bucket: int  # the bucket bound it rounds up to, clipped to max_tokens


class Predictor(Protocol):
    name: str
    oracle: bool  # reads true lengths: only these are bound to a `TrueLengths` lookup

    def bind(self, lengths: TrueLengths) -> None: ...

    def predict(self, query: PredictionQuery) -> Prediction: ...

    def observe(self, prompt_len: int, output_len: int) -> None: ...


_KNOWN_LENGTHS = "simulations, or in a live server requests with ignore_eos and no stop tokens"


class _Base:
    name = ""
    oracle = False

    def __init__(self, buckets: BucketScheme | None = None) -> None:
        self.buckets = buckets or BucketScheme()

    def bind(self, lengths: TrueLengths) -> None:
        raise TypeError(f"the {self.name} predictor is no oracle: it is never given true lengths")

    def _make(self, length: float, max_tokens: int) -> Prediction:
        n = max(1, min(max_tokens, math.ceil(length)))
        return Prediction(n, self.buckets.bucket(n, max_tokens))

    def predict(self, query: PredictionQuery) -> Prediction:
        raise NotImplementedError

    def observe(self, prompt_len: int, output_len: int) -> None:
        return None


class _Oracle(_Base):
    """A predictor that reads true lengths, through the lookup bound to it (and nothing else)."""

    oracle = True

    def __init__(self, buckets: BucketScheme | None = None) -> None:
        super().__init__(buckets)
        self._lengths: TrueLengths | None = None

    def bind(self, lengths: TrueLengths) -> None:
        self._lengths = lengths

    def _true_length(self, query: PredictionQuery) -> int:
        n = None if self._lengths is None else self._lengths(query.request_id)
        if n is None:
            raise ValueError(f"the {self.name} predictor needs each request's true length: {_KNOWN_LENGTHS}")
        return n


class OraclePredictor(_Oracle):
    name = "oracle"

    def predict(self, query: PredictionQuery) -> Prediction:
        return self._make(self._true_length(query), query.max_tokens)


class NoisyOraclePredictor(_Oracle):
    name = "oracle-noisy"

    def __init__(self, sigma: float = 0.5, seed: int = 0, buckets: BucketScheme | None = None) -> None:
        super().__init__(buckets)
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma
        self.rng = random.Random(seed)

    def predict(self, query: PredictionQuery) -> Prediction:
        return self._make(self._true_length(query) * math.exp(self.rng.gauss(0.0, self.sigma)), query.max_tokens)


class FixedPredictor(_Base):
    name = "fixed"

    def __init__(self, length: float = 128, buckets: BucketScheme | None = None) -> None:
        super().__init__(buckets)
        if not length >= 1 or length != int(length):
            raise ValueError(f"the fixed predictor's length must be a whole number >= 1, got {length}")
        self.length = int(length)

    def predict(self, query: PredictionQuery) -> Prediction:
        return self._make(self.length, query.max_tokens)


class HistogramPredictor(_Base):
    name = "histogram"

    def __init__(
        self, quantile: float = 0.9, min_samples: int = 20, window: int = 2000, buckets: BucketScheme | None = None
    ) -> None:
        super().__init__(buckets)
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if min_samples < 1 or window < min_samples:
            raise ValueError(f"need 1 <= min_samples <= window, got {min_samples} and {window}")
        self.quantile, self.min_samples, self.window = quantile, min_samples, window
        self._bins: dict[int, tuple[deque[int], list[int]]] = {}  # bin -> (arrival order, sorted)
        self._all: tuple[deque[int], list[int]] = (deque(), [])

    @staticmethod
    def bin_of(prompt_len: int) -> int:
        return max(0, prompt_len - 1).bit_length()  # 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...

    def observe(self, prompt_len: int, output_len: int) -> None:
        if output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {output_len}")
        for order, ordered in (self._bins.setdefault(self.bin_of(prompt_len), (deque(), [])), self._all):
            order.append(output_len)
            bisect.insort(ordered, output_len)
            if len(order) > self.window:  # forget the oldest: lengths drift with the workload
                ordered.pop(bisect.bisect_left(ordered, order.popleft()))

    def predict(self, query: PredictionQuery) -> Prediction:
        ordered = self._bins.get(self.bin_of(query.prompt_len), (deque(), []))[1]
        if len(ordered) < self.min_samples:
            ordered = self._all[1]
        if not ordered:
            return self._make(query.max_tokens, query.max_tokens)
        rank = min(len(ordered), max(1, math.ceil(self.quantile * len(ordered))))
        return self._make(ordered[rank - 1], query.max_tokens)


class LearnedPredictor(_Base):
    name = "learned"

    def __init__(self, path: str | None = None, quantile: float = 0.5, buckets: BucketScheme | None = None) -> None:
        super().__init__(buckets)
        if path is not None and not isinstance(path, str):
            raise ValueError(f"the learned predictor's path must be a folder name, got {path!r}")
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)):
            raise ValueError(f"the learned predictor's quantile must be a number such as 0.5 or 0.9, got {quantile!r}")
        self.model = load_length_model(path)
        self.quantile = float(quantile)
        self.head = self.model.head(self.quantile)  # ValueError naming the levels the model has

    def predict(self, query: PredictionQuery) -> Prediction:
        if query.prompt_token_ids is None:
            raise ValueError("the learned predictor needs each request's prompt_token_ids in its PredictionQuery")
        lengths = self.model.predict_one(query.prompt_token_ids, query.prompt_len)
        return self._make(float(lengths[self.head]), query.max_tokens)

    def predict_batch(self, queries: Sequence[PredictionQuery]) -> list[Prediction]:
        """One vectorised pass over many queries (what admission of a burst can use)."""
        prompts = []
        for q in queries:
            if q.prompt_token_ids is None:
                raise ValueError("the learned predictor needs each request's prompt_token_ids in its PredictionQuery")
            prompts.append(q.prompt_token_ids)
        lengths = self.model.predict(prompts, [q.prompt_len for q in queries])[:, self.head]
        return [self._make(float(n), q.max_tokens) for n, q in zip(lengths, queries)]


PREDICTORS: dict[str, type[_Base]] = {
    p.name: p for p in (OraclePredictor, NoisyOraclePredictor, FixedPredictor, HistogramPredictor, LearnedPredictor)
}


def make_predictor(name: str, buckets: BucketScheme | None = None, **kwargs: Any) -> Predictor:
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}")
    try:
        return PREDICTORS[name](buckets=buckets, **kwargs)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"predictor {name!r} does not take options {sorted(kwargs)}") from None

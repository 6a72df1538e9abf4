"""How good a length predictor is (the figures of issue 8), the two baselines, and published anchors."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ecoserve.predictor.buckets import BucketScheme

# Published figures, each on its own model and data (not measured here; see docs/predictor.md).
ANCHORS: list[dict[str, Any]] = [
    {"name": "Zheng et al. 2023 (served LLM + adapter, 50-token buckets)", "mae": 62.0, "within_50": 0.59,
     "within_100": 0.81},
    {"name": "learning to rank (OPT-125M ranker)", "kendall_tau": 0.56},
    {"name": "learning to rank: 10-bucket classifier", "kendall_tau": 0.19},
    {"name": "S3 (DistilBERT bucket classifier)"},
]
_NO_CLIP = 1 << 30


@dataclass(frozen=True)
class LengthMetrics:
    n: int
    mae: float  # mean |predicted - true| tokens, point prediction
    within_50: float  # share of point predictions within 50 tokens of the truth
    within_100: float
    bucket_accuracy: float  # point prediction in the true length's EcoServe bucket (32 wide to 512, then doubling)
    kendall_tau: float  # tau-b between point predictions and true lengths (0 for a constant predictor)
    under_rate: float | None  # share of true lengths above the padded (upper-quantile) prediction
    mean_padding: float | None  # mean tokens the padded prediction reserves beyond the truth (0 when under)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def kendall_tau(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> float:
    """Kendall's tau-b (ties in either variable corrected); 0 when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    concordance = pairs_a = pairs_b = 0
    for i in range(0, len(a), chunk):
        sa = np.sign(a[i : i + chunk, None] - a[None, :]).astype(np.int8)  # [chunk, n]
        sb = np.sign(b[i : i + chunk, None] - b[None, :]).astype(np.int8)
        concordance += int((sa.astype(np.int64) * sb).sum())
        pairs_a += int(np.count_nonzero(sa))
        pairs_b += int(np.count_nonzero(sb))
    if pairs_a == 0 or pairs_b == 0:
        return 0.0
    return float(concordance / np.sqrt(float(pairs_a) * float(pairs_b)))


def length_metrics(point: np.ndarray, true: np.ndarray, upper: np.ndarray | None = None) -> LengthMetrics:
    """Figures for point predictions (and padded ones, when given) against true lengths; all in tokens."""
    point = np.maximum(1, np.ceil(np.asarray(point, dtype=np.float64))).astype(np.int64)
    true = np.asarray(true, dtype=np.int64)
    err = np.abs(point - true)
    scheme = BucketScheme()
    same_bucket = [scheme.bucket(int(p), _NO_CLIP) == scheme.bucket(int(t), _NO_CLIP) for p, t in zip(point, true)]
    under = pad = None
    if upper is not None:
        up = np.maximum(1, np.ceil(np.asarray(upper, dtype=np.float64)))
        under, pad = float(np.mean(true > up)), float(np.mean(np.maximum(up - true, 0)))
    return LengthMetrics(
        n=len(true), mae=float(err.mean()), within_50=float(np.mean(err <= 50)), within_100=float(np.mean(err <= 100)),
        bucket_accuracy=float(np.mean(same_bucket)), kendall_tau=kendall_tau(point, true), under_rate=under,
        mean_padding=pad,
    )


@dataclass(frozen=True)
class LengthOnlyBaseline:
    """Per prompt-length bin (powers of two, as the histogram predictor), training quantiles of the
    output length; bins with fewer than `min_samples` examples use all of them."""

    edges_log2: tuple[int, ...]  # bin ids that have their own row
    table: dict[str, list[float]]  # str(level) -> per-bin quantile, last entry = all bins

    @staticmethod
    def bin_of(prompt_lens: np.ndarray) -> np.ndarray:
        return np.ceil(np.log2(np.maximum(np.asarray(prompt_lens, dtype=np.float64), 1))).astype(np.int64)

    @classmethod
    def fit(cls, prompt_lens: np.ndarray, y: np.ndarray, levels: tuple[float, ...], min_samples: int = 20) -> LengthOnlyBaseline:
        bins = cls.bin_of(prompt_lens)
        kept = tuple(int(b) for b in np.unique(bins) if np.sum(bins == b) >= min_samples)
        table = {
            str(q): [float(np.quantile(y[bins == b], q)) for b in kept] + [float(np.quantile(y, q))] for q in levels
        }
        return cls(kept, table)

    def predict(self, prompt_lens: np.ndarray, level: float) -> np.ndarray:
        row = {b: i for i, b in enumerate(self.edges_log2)}
        values = self.table[str(level)]
        return np.array([values[row.get(int(b), len(values) - 1)] for b in self.bin_of(prompt_lens)])

    def to_json(self) -> dict[str, Any]:
        return {"bins_log2": list(self.edges_log2), "quantiles": self.table}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LengthOnlyBaseline:
        return cls(tuple(int(b) for b in data["bins_log2"]), {str(k): list(v) for k, v in data["quantiles"].items()})


def fit_baselines(prompt_lens: np.ndarray, y: np.ndarray, levels: tuple[float, ...]) -> dict[str, Any]:
    """JSON-safe: the training mean (and its quantiles, for padding) and the prompt-length table."""
    return {
        "mean": float(np.mean(y)),
        "quantiles": {str(q): float(np.quantile(y, q)) for q in levels},
        "prompt_length": LengthOnlyBaseline.fit(prompt_lens, y, levels).to_json(),
    }


def baseline_predictions(baselines: dict[str, Any], prompt_lens: np.ndarray, level: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (point, padded) for the two baselines at padded quantile `level`."""
    n = len(prompt_lens)
    table = LengthOnlyBaseline.from_json(baselines["prompt_length"])
    return {
        "baseline: training mean": (np.full(n, baselines["mean"]), np.full(n, baselines["quantiles"][str(level)])),
        "baseline: prompt length": (table.predict(prompt_lens, 0.5), table.predict(prompt_lens, level)),
    }

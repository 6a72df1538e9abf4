"""The learned length model: linear quantile heads over hashed token-id features (numpy only).

Each head k predicts log(output tokens) at quantile level `quantiles[k]` (0.5 first: the point
prediction), plus a calibration offset fitted on the validation split so that the head's
coverage there is its level. An artifact is a folder of two files, read without executing
anything from them: `model.json` (format, feature spec, levels, offsets, how it was trained)
and `model.safetensors` (the weight arrays). `ecoserve predictor train --out DIR` writes one;
a default trained on ShareGPT ships in `ecoserve/data/predictor/`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from ecoserve.predictor.features import (
    NUM_DENSE, FeatureSpec, Lengths, TokenIds, dense_features, hashed_ngrams, hashed_ngrams_one,
)

FORMAT = "ecoserve-length-model/1"
META_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_COMMAND = "ecoserve predictor train --out DIR"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "predictor"


@dataclass(frozen=True)
class LengthModel:
    spec: FeatureSpec
    quantiles: tuple[float, ...]  # head levels, increasing; quantiles[0] == 0.5 is the point
    sparse: np.ndarray  # [dim, 1 or k] weights of the hashed features (1: shared by every head)
    dense: np.ndarray  # [NUM_DENSE, 1 or k] weights of dense_features
    offsets: np.ndarray  # [k] log-scale shifts calibrated on validation
    max_length: int  # predictions are clipped to [1, max_length]
    info: dict[str, Any] = field(default_factory=dict)  # training facts, baselines; JSON-safe

    def __post_init__(self) -> None:
        k = len(self.quantiles)
        if k < 1 or self.quantiles[0] != 0.5 or any(a >= b for a, b in zip(self.quantiles, self.quantiles[1:])):
            raise ValueError(f"quantile levels must be increasing and start at 0.5, got {list(self.quantiles)}")
        if self.sparse.shape[0] != self.spec.dim or self.sparse.shape[1] not in (1, k):
            raise ValueError(f"sparse weights must be [{self.spec.dim}, 1 or {k}], got {list(self.sparse.shape)}")
        if self.dense.shape[0] != NUM_DENSE or self.dense.shape[1] not in (1, k):
            raise ValueError(f"dense weights must be [{NUM_DENSE}, 1 or {k}], got {list(self.dense.shape)}")
        if self.offsets.shape != (k,):
            raise ValueError(f"offsets must be [{k}], got {list(self.offsets.shape)}")

    def head(self, quantile: float) -> int:
        """The index of the head at level `quantile`; ValueError naming the levels it has."""
        for i, q in enumerate(self.quantiles):
            if math.isclose(q, quantile, abs_tol=1e-9):
                return i
        raise ValueError(f"this length model has quantile levels {list(self.quantiles)}, not {quantile}")

    def predict_log(self, prompts: Sequence[TokenIds], prompt_lens: Lengths | None = None) -> np.ndarray:
        """[n, k] log output tokens per head, before clipping; a higher level never predicts less."""
        lens = [len(p) for p in prompts] if prompt_lens is None else prompt_lens
        rows = hashed_ngrams(prompts, self.spec)
        out = rows.dot(self.sparse) + dense_features(lens) @ self.dense  # [n, 1 or k]
        out = np.broadcast_to(out, (len(prompts), len(self.quantiles))) + self.offsets
        return np.maximum.accumulate(out, axis=1)  # separately fitted heads may cross

    def predict_one(self, prompt: TokenIds, prompt_len: int | None = None) -> np.ndarray:
        """[k] predicted output tokens of one prompt: `predict` of a batch of one, faster."""
        slots, values = hashed_ngrams_one(prompt, self.spec)
        lp = math.log1p(len(prompt) if prompt_len is None else prompt_len)
        out = values @ self.sparse[slots] + (lp * self.dense[0] + (lp * lp / 10.0) * self.dense[1] + self.dense[2])
        out = np.maximum.accumulate(np.broadcast_to(out, self.offsets.shape) + self.offsets)
        return np.clip(np.exp(out), 1.0, float(self.max_length))

    def predict(self, prompts: Sequence[TokenIds], prompt_lens: Lengths | None = None) -> np.ndarray:
        """[n, k] predicted output tokens per head (float), clipped to [1, max_length]."""
        return np.clip(np.exp(self.predict_log(prompts, prompt_lens)), 1.0, float(self.max_length))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # float16 weights: the artifact stays small, and predictions move by < 0.1 token.
        save_file(
            {"sparse": self.sparse.astype(np.float16), "dense": self.dense.astype(np.float32)},
            str(folder / WEIGHTS_FILE),
        )
        meta = {
            "format": FORMAT, "features": self.spec.to_json(), "quantiles": list(self.quantiles),
            "offsets": [float(x) for x in self.offsets], "max_length": self.max_length, "info": self.info,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return folder


def load_length_model(path: str | Path | None = None) -> LengthModel:
    """The artifact in folder `path` (default: the one bundled in the package)."""
    folder = DEFAULT_DIR if path is None else Path(path)
    meta_file, weights_file = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_file.is_file() or not weights_file.is_file():
        which = "the bundled length model" if path is None else f"length model folder {str(folder)!r}"
        raise FileNotFoundError(
            f"{which} lacks {META_FILE} and/or {WEIGHTS_FILE}; train one with `{TRAIN_COMMAND}` "
            "and pass path=DIR (for example --predictor-option path=DIR)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r}; this EcoServe reads {FORMAT!r}")
    weights = load_file(str(weights_file))
    return LengthModel(
        spec=FeatureSpec.from_json(meta["features"]),
        quantiles=tuple(float(q) for q in meta["quantiles"]),
        sparse=weights["sparse"].astype(np.float64),
        dense=weights["dense"].astype(np.float64),
        offsets=np.asarray(meta["offsets"], dtype=np.float64),
        max_length=int(meta["max_length"]),
        info=dict(meta.get("info", {})),
    )

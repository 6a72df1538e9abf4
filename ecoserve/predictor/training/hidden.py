"""Candidate: a ridge head on the default model's own hidden states (the served model reading its
prompt, as Zheng et al. do). Needs torch, so it is compared, never deployed in the coordinator.

Each prompt (its first and last `max_tokens // 2` tokens when longer) goes through SmolLM2-135M;
the features are the final layer's states averaged over the prompt and the state of its last
token ([2 * hidden] per prompt). On this machine's 2 CPU cores the model reads ~170 tokens/s, so
the candidate trains on a subset of the training part; features are cached per part.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from ecoserve.predictor.training.fit import calibrate

MODEL = "smollm2-135m"
RIDGE_GRID = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _clip(ids: np.ndarray, max_tokens: int) -> np.ndarray:
    if len(ids) <= max_tokens:
        return ids
    half = max_tokens // 2
    return np.concatenate([ids[:half], ids[len(ids) - (max_tokens - half):]])


def hidden_features(prompts: list[np.ndarray], max_tokens: int = 64, batch_size: int = 16, log_every: int = 10) -> np.ndarray:
    """[n, 2 * hidden] float32: mean-pooled and last-token final-layer states of each prompt."""
    import torch
    from transformers import AutoModel

    from ecoserve.model.registry import resolve_model

    model = AutoModel.from_pretrained(str(resolve_model(MODEL)), dtype=torch.float32).eval()
    clipped = [_clip(np.asarray(p), max_tokens) for p in prompts]
    order = np.argsort([len(c) for c in clipped], kind="stable")  # similar lengths share a batch
    out = np.zeros((len(prompts), 2 * model.config.hidden_size), dtype=np.float32)
    start = time.perf_counter()
    with torch.inference_mode():
        for b, i in enumerate(range(0, len(order), batch_size)):
            idx = order[i : i + batch_size]
            width = max(len(clipped[j]) for j in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                ids[r, : len(clipped[j])] = torch.from_numpy(clipped[j].astype(np.int64))
                mask[r, : len(clipped[j])] = 1
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, width, hidden]
            m = mask.unsqueeze(-1).to(states.dtype)
            mean = (states * m).sum(1) / m.sum(1)
            last = states[torch.arange(len(idx)), mask.sum(1) - 1]
            out[idx] = torch.cat([mean, last], dim=1).numpy()
            if log_every and (b + 1) % log_every == 0:
                done = i + len(idx)
                print(f"  hidden states: {done}/{len(order)} prompts, {time.perf_counter() - start:.0f} s", flush=True)
    return out


def cached_hidden_features(cache: Path, name: str, ids: list[str], prompts: list[np.ndarray], max_tokens: int) -> np.ndarray:
    """hidden_features, kept in `cache` keyed by the item ids and `max_tokens`."""
    key = hashlib.sha256(json.dumps([ids, max_tokens]).encode()).hexdigest()[:16]
    file = cache / f"hidden-{name}-{key}.safetensors"
    if file.is_file():
        return load_file(str(file))["features"]
    features = hidden_features(prompts, max_tokens)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"features": features}, str(file))
    return features


@dataclass
class HiddenHead:
    """Ridge regression of log length on standardised hidden features, with calibrated levels."""

    mean: np.ndarray  # [f]
    scale: np.ndarray  # [f]
    weight: np.ndarray  # [f + 1] (intercept last)
    offsets: np.ndarray  # [k]
    quantiles: tuple[float, ...]
    ridge: float
    max_tokens: int
    max_length: int

    def predict_log(self, features: np.ndarray) -> np.ndarray:
        x = (features - self.mean) / self.scale
        base = x @ self.weight[:-1] + self.weight[-1]
        return base[:, None] + self.offsets  # [n, k]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"mean": self.mean, "scale": self.scale, "weight": self.weight}, str(folder / "head.safetensors"))
        meta = {"kind": "hidden-state ridge head", "model": MODEL, "offsets": self.offsets.tolist(),
                "quantiles": list(self.quantiles), "ridge": self.ridge, "max_tokens": self.max_tokens,
                "max_length": self.max_length}
        (folder / "head.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> HiddenHead:
        meta: dict[str, Any] = json.loads((folder / "head.json").read_text())
        w = load_file(str(folder / "head.safetensors"))
        return cls(w["mean"], w["scale"], w["weight"], np.asarray(meta["offsets"]), tuple(meta["quantiles"]),
                   float(meta["ridge"]), int(meta["max_tokens"]), int(meta["max_length"]))


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    reg = lam * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def fit_hidden_head(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
    quantiles: tuple[float, ...], max_tokens: int,
) -> HiddenHead:
    """Ridge strength chosen by validation MAE of the calibrated median; levels calibrated on validation."""
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / scale, (val_x - mean) / scale
    best: HiddenHead | None = None
    best_mae = np.inf
    for lam in RIDGE_GRID:
        w = _ridge(tx.astype(np.float64), np.log(train_y), lam)
        base = vx @ w[:-1] + w[-1]
        offsets = calibrate(base[:, None], np.log(val_y), quantiles)
        mae = float(np.mean(np.abs(np.exp(base + offsets[0]) - val_y)))
        if mae < best_mae:
            best_mae = mae
            best = HiddenHead(mean, scale, w, offsets, quantiles, lam, max_tokens, int(train_y.max()))
    assert best is not None
    return best

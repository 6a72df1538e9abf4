"""Fitting linear length heads (numpy): quantile (pinball) or least-squares regression on log length,
with Adam over mini-batches, and calibration of each head's level on held-out data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecoserve.predictor.features import SparseRows

LOSSES = ("pinball", "squared")


@dataclass(frozen=True)
class FitConfig:
    loss: str = "pinball"
    epochs: int = 20
    lr: float = 3e-3
    l2: float = 1e-5  # on the sparse weights only
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.l2 < 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0, l2 >= 0; got {self}")


@dataclass
class Heads:
    sparse: np.ndarray  # [dim, k]
    dense: np.ndarray  # [num_dense, k]

    def predict(self, rows: SparseRows | None, dense: np.ndarray) -> np.ndarray:
        """[n, k] log-length predictions (uncalibrated)."""
        out = dense @ self.dense
        return out if rows is None else out + rows.dot(self.sparse)


class _Adam:
    def __init__(self, shapes: list[tuple[int, ...]], lr: float) -> None:
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]
        self.lr, self.t = lr, 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1 - 0.9**self.t, 1 - 0.999**self.t
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= self.lr * (m / c1) / (np.sqrt(v / c2) + 1e-8)


def fit_heads(
    rows: SparseRows | None, dim: int, dense: np.ndarray, log_y: np.ndarray, quantiles: tuple[float, ...], cfg: FitConfig
) -> Heads:
    """Fit one head per quantile level (pinball loss) or one shared head (squared loss).

    `dense` is [n, num_dense] and must hold a constant column last (the intercept).
    """
    k = len(quantiles) if cfg.loss == "pinball" else 1
    q = np.asarray(quantiles if cfg.loss == "pinball" else (0.5,))
    n = len(log_y)
    heads = Heads(np.zeros((dim, k)), np.zeros((dense.shape[1], k)))
    heads.dense[-1] = np.quantile(log_y, q) if cfg.loss == "pinball" else log_y.mean()
    adam = _Adam([heads.sparse.shape, heads.dense.shape], cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.epochs):
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = rows.take(idx) if rows is not None else None
            residual = log_y[idx, None] - heads.predict(batch, dense[idx])  # [b, k]
            if cfg.loss == "pinball":
                grad_out = np.where(residual > 0, -q, 1 - q) / len(idx)
            else:
                grad_out = -residual / len(idx)
            g_sparse = cfg.l2 * heads.sparse
            if batch is not None:
                r = batch.row_ids()
                for j in range(k):
                    g_sparse[:, j] += np.bincount(batch.indices, weights=batch.values * grad_out[r, j], minlength=dim)
            adam.step([heads.sparse, heads.dense], [g_sparse, dense[idx].T @ grad_out])
    return heads


def calibrate(pred_log: np.ndarray, log_y: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """[k] shifts so that head j covers a `quantiles[j]` share of held-out examples.

    `pred_log` is [n, k] (or [n, 1], shared by every level: then the shifts are residual quantiles).
    """
    pred = np.broadcast_to(pred_log, (len(log_y), len(quantiles)))
    residual = log_y[:, None] - pred
    return np.array([np.quantile(residual[:, j], q, method="higher") for j, q in enumerate(quantiles)])

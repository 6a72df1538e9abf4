"""`ecoserve predictor eval`: the learned predictor on ShareGPT's test part, next to the two
baselines, every candidate saved beside the artifact, and the published anchors; prints a table,
times inference, and writes JSON with a flat `summary`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ecoserve.predictor.training.data import LengthData, load_length_data, smollm2_encoder
from ecoserve.predictor.training.metrics import ANCHORS, baseline_predictions, length_metrics
from ecoserve.predictor.training.train import machine_info, metrics_row, print_table
from ecoserve.predictor.learned import DEFAULT_DIR, META_FILE, load_length_model
from ecoserve.predictor.predictors import LearnedPredictor, PredictionQuery


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR", help=f"artifact folder (default: the bundled one, {DEFAULT_DIR})")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON here")
    p.add_argument("--limit", type=int, default=None, help="read only the first N ShareGPT conversations")
    p.add_argument("--quantile", type=float, default=None, help="padded level (default: the model's highest)")
    p.add_argument("--no-hidden", action="store_true", help="skip a hidden-state candidate (it runs SmolLM2 on the test prompts)")


def time_inference(path: str | None, prompts: list[np.ndarray], batch: int = 256, repeats: int = 3) -> dict[str, float]:
    """Microseconds per request through LearnedPredictor, one query at a time and in batches of
    `batch`: wall time and this process's CPU time (the lower is the truer on a shared machine);
    best of `repeats`."""
    pred = LearnedPredictor(path=path)
    queries = [PredictionQuery(len(p), 4096, prompt_token_ids=p.tolist()) for p in prompts]
    single = queries[: min(len(queries), 500)]
    best: dict[str, float] = {}

    def clock(name: str, work: Callable[[], object], n: int) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        work()
        w, c = (time.perf_counter() - w0) / n, (time.process_time() - c0) / n
        best[f"{name}_us"] = min(best.get(f"{name}_us", float("inf")), round(1e6 * w, 1))
        best[f"{name}_cpu_us"] = min(best.get(f"{name}_cpu_us", float("inf")), round(1e6 * c, 1))

    for _ in range(repeats):
        clock("single", lambda: [pred.predict(q) for q in single], len(single))
        clock("batched", lambda: [pred.predict_batch(queries[i : i + batch]) for i in range(0, len(queries), batch)],
              len(queries))
    return best | {"batch": batch}


def _candidate_rows(folder: Path, test: LengthData, level: float, hidden: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for cand in sorted(p for p in (folder / "candidates").glob("*") if p.is_dir()):
        if (cand / META_FILE).is_file():
            model = load_length_model(cand)
            pred = model.predict(test.prompts, test.prompt_lens)
            rows.append(metrics_row(f"candidate: {cand.name}", length_metrics(pred[:, 0], test.output_lens, pred[:, model.head(level)]),
                             "torch-free"))
        elif (cand / "head.json").is_file() and hidden:
            from ecoserve.predictor.training.hidden import HiddenHead, cached_hidden_features

            head = HiddenHead.load(cand)
            x = cached_hidden_features(folder / "cache", "test", test.ids, test.prompts, head.max_tokens)
            pred = np.exp(head.predict_log(x))
            j = head.quantiles.index(level)
            rows.append(metrics_row(f"candidate: {cand.name}", length_metrics(pred[:, 0], test.output_lens, pred[:, j]),
                             "needs torch (not deployable in the coordinator)"))
    return rows


def run_eval(args: argparse.Namespace) -> int:
    model = load_length_model(args.model)
    level = args.quantile if args.quantile is not None else model.quantiles[-1]
    model.head(level)  # ValueError naming the levels it has
    seed = int(model.info.get("data", {}).get("seed", 0))
    start = time.perf_counter()
    test = load_length_data(["test"], smollm2_encoder(), seed=seed, limit=args.limit)["test"]
    print(f"ShareGPT test part: {len(test)} examples (split seed {seed}; {time.perf_counter() - start:.1f} s)")
    pred = model.predict(test.prompts, test.prompt_lens)
    learned = metrics_row(f"learned ({model.info.get('candidate', '?')})",
                   length_metrics(pred[:, 0], test.output_lens, pred[:, model.head(level)]), "deployed")
    rows = [learned]
    for name, (point, upper) in baseline_predictions(model.info["baselines"], test.prompt_lens, level).items():
        rows.append(metrics_row(name, length_metrics(point, test.output_lens, upper), "baseline"))
    if args.model is not None:
        rows += _candidate_rows(Path(args.model), test, level, hidden=not args.no_hidden)
    timing = time_inference(args.model, test.prompts)
    print_table(f"Test ({len(test)} examples; padded quantile {level})", rows)
    print("\nPublished anchors (their own models and data; not measured here):")
    for a in ANCHORS:
        figures = ", ".join(f"{k} {v}" for k, v in a.items() if k != "name") or "no comparable figure"
        print(f"  {a['name']}: {figures}")
    print(f"\ninference per request (wall / CPU): {timing['single_us']} / {timing['single_cpu_us']} us one at a "
          f"time, {timing['batched_us']} / {timing['batched_cpu_us']} us in batches of {timing['batch']}")
    base = {r["name"]: r for r in rows if r["about"] == "baseline"}
    beats = all(learned["mae"] < b["mae"] and learned["kendall_tau"] > b["kendall_tau"] for b in base.values())
    print(f"learned beats both baselines on MAE and Kendall's tau: {'yes' if beats else 'NO'}")
    if args.out:
        summary = {
            "mae": learned["mae"], "within_50": learned["within_50"], "within_100": learned["within_100"],
            "bucket_accuracy": learned["bucket_accuracy"], "kendall_tau": learned["kendall_tau"],
            "under_rate": learned["under_rate"], "padded_quantile": level, "num_test": len(test),
            "baseline_mean_mae": base["baseline: training mean"]["mae"],
            "baseline_prompt_len_mae": base["baseline: prompt length"]["mae"],
            "baseline_prompt_len_tau": base["baseline: prompt length"]["kendall_tau"],
            "beats_baselines": beats, "single_us": timing["single_us"], "batched_us": timing["batched_us"],
            "single_cpu_us": timing["single_cpu_us"], "batched_cpu_us": timing["batched_cpu_us"],
            "train_seconds": model.info.get("train_seconds"),
        }
        result = {"summary": summary, "test": rows, "anchors": ANCHORS, "inference": timing,
                  "model": str(args.model or DEFAULT_DIR), "model_info": model.info, "machine": machine_info()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0

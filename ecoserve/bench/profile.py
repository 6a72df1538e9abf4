"""`ecoserve profile`: measure our own engine's step times and fit a latency profile in
DistServe's form (latency/fit.py fits), for the simulator and the sim engine.

Each sample is one `LLMEngine.step()` (schedule, prepare, forward, sample: a worker's step)
with the KV pool, block size and torch threads a serving worker gets (`--threads` defaults to
cores / 2: what `serve` gives each of its default 1 prefill + 1 decode workers). A prefill
batch is whole prompts queued together and admitted in one step; a decode batch is sequences
whose context is already in the pool, set up as a decode worker sets up a request once its KV
has arrived. The grid (latency/fit.py's make_grid) runs prompts of 16 .. `--max-len` tokens
alone and in batches of up to `--max-len` tokens; decode batches of 1 .. `--max-batch` at three
context lengths, uniform and spread (the torch decode path pads every sequence to the longest);
and mixed steps: k = 1, 4, 16 .. `--max-batch` decoding requests (set up as above) with one
prompt of 16, max-len/4 or max-len tokens queued behind them, which the engine's FCFS batcher
runs in the same step, one forward pass, as on a colocated worker. The mixed steps fit nothing:
they choose how the profile costs a mixed step (`mixed_form`, fit.py's fit_mixed: "fused", one
fixed cost, or "additive", a prefill step plus a decode step) on all but every 4th, and the
table and `summary` give both forms' error on those held back. Points are timed in `--repeats`
rounds, every point of the three kinds once a round, so load drifting on a shared machine hits
them alike; each keeps its median. A decode or mixed step is set up afresh each round and timed
once (in the first round, after an untimed one).

On the CPU with one thread, steps are timed by this thread's CPU time (`--clock auto`): all of
a step's work runs on it, so on a quiet machine it equals the wall time, and on a busy one it
does not grow with the time other processes hold the core (one on the same physical core
still slows it some). The JSON loads with
`ecoserve.latency.profile.load_profile`; its other keys say how it was measured. No torch at
import: the CLI imports `add_arguments` while it builds its parser.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ecoserve.latency.fit import (
    MIN_LEN, DecodeFit, DecodeSample, Fit, Grid, MixedFit, MixedPoint, MixedSample, PrefillSample, fit_decode,
    HOLD_OUT_EVERY, fit_mixed, fit_prefill, fitted_profile, make_grid,
)
from ecoserve.latency.profile import MIXED_FORMS

if TYPE_CHECKING:
    from ecoserve.engine.llm_engine import LLMEngine
    from ecoserve.engine.sequence import Sequence

QUICK = dict(max_len=256, max_batch=16, repeats=3)  # --quick


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Everything but the model options (ecoserve.model.commands.add_model_arguments)."""
    p.add_argument("--out", required=True, help="write the profile here (.json; folders are created)")
    p.add_argument(
        "--max-len", type=int, default=512,
        help="longest prompt and decode context, and the most tokens in a prefill batch",
    )
    p.add_argument("--max-batch", type=int, default=128, help="largest decode batch (and prefill batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each grid point (the median is kept)")
    p.add_argument("--threshold", type=int, default=None, help="fix the decode small/large batch threshold")
    p.add_argument(
        "--decode-context", default="auto", choices=["auto", "sum", "padded"],
        help="decode cost by Σctx (DistServe's form) or by batch·max(ctx) (padded batches, our CPU path); "
        "auto: whichever fits the samples better",
    )
    p.add_argument(
        "--refit", default=None, metavar="PROFILE",
        help="measure nothing: fit again from the samples a profile file holds (with --threshold, --decode-context) "
        "and write it to --out",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: ECOSERVE_NUM_THREADS or cores/2)")
    p.add_argument(
        "--clock", default="auto", choices=["auto", "wall", "cpu"],
        help="time steps by the wall clock, or by this thread's CPU time (CPU, 1 thread: immune to other processes "
        "on a busy machine); auto: cpu when profiling the CPU with 1 thread, else wall",
    )
    p.add_argument("--quick", action="store_true", help="a small grid for tests: max-len 256, max-batch 16, 3 repeats")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: from --kv-cache-gib)")
    p.add_argument("--gpu-memory-fraction", type=float, default=None, help="KV pool = this share of free GPU memory")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV pool size (when neither of the above)")


# --- measuring -------------------------------------------------------------------------------


class StepTimer:
    """Times `engine.step()` on batches built the way the prefill and decode workers build them.

    `cpu_clock` times by this thread's CPU time instead of the wall clock: with one torch thread
    on the CPU all of a step's work runs on this thread, so on a quiet machine the two agree,
    and on a busy one (other processes taking turns on the cores) only the wall time grows.
    Every step also records the share of its wall time the process spent on the CPU.
    """

    def __init__(self, engine: LLMEngine, threads: int, cpu_clock: bool = False) -> None:
        import torch

        self.engine = engine
        self.cuda = engine.device == "cuda"
        self._sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self._ids = itertools.count()
        self.threads, self.cpu_clock = threads, cpu_clock
        self.cpu_shares: list[float] = []  # process CPU time / (wall time · threads), per timed step

    def _prompt(self, n: int) -> list[int]:
        start, vocab = next(self._ids) * 7919, self.engine.spec.vocab_size
        return [3 + (start + i) % (vocab - 3) for i in range(n)]

    def _timed_step(self) -> float:
        self._sync()
        wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
        self.engine.step()
        self._sync()
        wall, cpu, thread = time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - thread
        if not self.cuda:
            self.cpu_shares.append(cpu / (wall * self.threads))
        return (thread if self.cpu_clock else wall) * 1e3

    def prefill(self, lens: list[int]) -> float:
        """One step prefilling whole prompts of `lens` tokens; each finishes on its first token."""
        from ecoserve.params import SamplingParams

        eng, params = self.engine, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        rids = [f"profile-{next(self._ids)}" for _ in lens]
        for rid, n in zip(rids, lens):
            eng.add_request(rid, self._prompt(n), params)
        ms = self._timed_step()
        if eng.last_num_scheduled_tokens != sum(lens) or eng.has_unfinished():
            raise RuntimeError(f"the engine did not prefill {lens} in one step; raise its token budget or batch size")
        for rid in rids:
            eng.pop_finished(rid)
        return ms

    def _decoding(self, ctxs: list[int]) -> list[Sequence]:
        """Sequences holding `ctxs` tokens of KV, set up as a decode worker sets up a request
        whose KV has arrived, each with room for 4 tokens."""
        from ecoserve.params import SamplingParams

        eng, params = self.engine, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        seqs = []
        for n in ctxs:
            seq = eng.new_sequence(f"profile-{next(self._ids)}", self._prompt(n), params)
            seq.block_table.ensure_capacity(n, eng.pool)
            seq.output_token_ids.append(self._prompt(1)[0])  # the first token, from the prefill side
            seq.num_computed_tokens = n
            eng.scheduler.add_running(seq)
            seqs.append(seq)
        return seqs

    def decode(self, ctxs: list[int], warmup: bool = False) -> DecodeSample:
        """One timed decode step (after an untimed one if `warmup`) over sequences holding
        `ctxs` tokens of KV (`_decoding`)."""
        eng, seqs = self.engine, self._decoding(ctxs)
        for _ in range(1 + warmup):
            ctx = [s.num_computed_tokens + 1 for s in seqs]  # the keys attention reads this step
            ms = self._timed_step()
            if eng.last_num_scheduled_tokens != len(ctxs):
                raise RuntimeError(f"the engine did not decode all {len(ctxs)} sequences in one step")
        for s in seqs:
            eng.release(s.request_id)
        return DecodeSample(len(ctx), sum(ctx), max(ctx), ms)

    def mixed(self, point: MixedPoint, warmup: bool = False) -> MixedSample:
        """One step decoding sequences holding `point.decode` tokens of KV (`_decoding`) while it
        prefills a whole prompt of `point.chunk` tokens queued behind them (the FCFS batcher
        schedules the running first): one forward pass. After an untimed one if `warmup`."""
        from ecoserve.params import SamplingParams

        eng, params = self.engine, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for _ in range(1 + warmup):
            seqs, rid = self._decoding(point.decode), f"profile-{next(self._ids)}"
            eng.add_request(rid, self._prompt(point.chunk), params)
            ctx = [s.num_computed_tokens + 1 for s in seqs]
            ms = self._timed_step()
            if eng.last_num_scheduled_tokens != len(seqs) + point.chunk:
                raise RuntimeError(
                    f"the engine did not decode {len(seqs)} sequences and prefill {point.chunk} tokens in one step; "
                    "raise its token budget or batch size"
                )
            eng.pop_finished(rid)
            for s in seqs:
                eng.release(s.request_id)
        return MixedSample(point.chunk, point.chunk**2, len(ctx), sum(ctx), max(ctx), ms)


# --- the command -----------------------------------------------------------------------------


def writable_json_path(out: str) -> Path:
    """`out` as a Path, its folder created; ValueError naming the problem when it cannot be written."""
    path = Path(out).expanduser()
    if path.suffix != ".json":
        raise ValueError(f"--out must name a .json file (load_profile reads profiles by that suffix), got {out!r}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        problem = exc.strerror or str(exc)
        raise ValueError(f"cannot write the profile to {out}: {problem}; give --out a writable path") from None
    if not existed:
        path.unlink()  # leave nothing behind if the run fails
    return path


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    if args.quick:
        settings.update(QUICK)
    for key in ("max_len", "max_batch", "repeats"):
        if settings[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    if settings["threads"] is None:
        from ecoserve.envs import num_threads

        settings["threads"] = num_threads() or max(1, (os.cpu_count() or 1) // 2)
    elif settings["threads"] < 1:
        raise ValueError(f"--threads must be >= 1, got {settings['threads']}")
    return settings


def _clock(clock: str, device: str, threads: int) -> str:
    if clock == "auto":
        return "cpu" if device == "cpu" and threads == 1 else "wall"
    if clock == "cpu" and (device != "cpu" or threads != 1):
        raise ValueError(f"--clock cpu needs the CPU and --threads 1, got {device} and {threads}; use --clock wall")
    return clock


def _build_engine(s: dict[str, Any]) -> LLMEngine:
    import torch

    from ecoserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from ecoserve.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=ModelConfig(model=s["model"], dtype=s["dtype"], device=s["device"]),
        cache=CacheConfig(
            block_size=s["block_size"], num_blocks=s["num_blocks"], gpu_memory_fraction=s["gpu_memory_fraction"],
            kv_cache_gib=s["kv_cache_gib"],
        ),
        # Room for every grid batch in one step: up to max_len prompt tokens and max_batch decodes
        # (a mixed step holds both, and one sequence more).
        scheduler=SchedulerConfig(s["max_batch"] + 1, max_num_batched_tokens=s["max_len"] + s["max_batch"]),
    )
    engine = LLMEngine(config)
    torch.set_num_threads(s["threads"])
    room = engine.max_model_len - 2
    if s["max_len"] > room:
        raise ValueError(f"--max-len {s['max_len']} leaves no room to decode in the model's context: at most {room}")
    return engine


class Samples(NamedTuple):
    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    mixed: list[MixedSample]


def measure(timer: StepTimer, grid: Grid, repeats: int) -> Samples:
    """Median step times over the grid, with one progress bar."""
    from tqdm.auto import tqdm

    warm = [min(MIN_LEN, grid.prefill[0][0])] * min(2, len(grid.decode[-1]))
    timer.prefill(warm)  # warm-up: thread pools, allocator, first-call paths
    timer.decode(warm, warmup=True)
    # Rounds, every point of every phase once a round: load drifting on a shared machine hits
    # every point alike, so the mixed steps compare fairly with the pure ones they are fitted by.
    times: list[list[float]] = [[] for _ in grid.prefill]
    steps: list[list[DecodeSample]] = [[] for _ in grid.decode]
    mixed_steps: list[list[MixedSample]] = [[] for _ in grid.mixed]
    total = (len(grid.prefill) + len(grid.decode) + len(grid.mixed)) * repeats
    with tqdm(total=total, desc="steps (prefill, decode, mixed)", unit="step") as bar:
        for r in range(repeats):
            for i, lens in enumerate(grid.prefill):
                times[i].append(timer.prefill(lens))
                bar.update()
            for i, ctxs in enumerate(grid.decode):
                steps[i].append(timer.decode(ctxs, warmup=r == 0))  # a new shape's first step is untimed
                bar.update()
            for i, point in enumerate(grid.mixed):
                mixed_steps[i].append(timer.mixed(point, warmup=r == 0))
                bar.update()
    prefill = [
        PrefillSample(len(lens), sum(lens), sum(n * n for n in lens), float(np.median(t)))
        for lens, t in zip(grid.prefill, times)
    ]
    decode = [sorted(st, key=lambda x: x.ms)[len(st) // 2] for st in steps]  # the median step, with its Σctx
    mixed = [sorted(st, key=lambda x: x.ms)[len(st) // 2] for st in mixed_steps]
    return Samples(prefill, decode, mixed)


def device_description(engine: LLMEngine, threads: int) -> str:
    from ecoserve.report import machine_info

    info = machine_info()
    if engine.device == "cuda":
        return f"{info.get('gpu', 'a CUDA GPU')}"
    return f"{info['cpu']} ({info['logical_cpus']} logical CPUs, {threads} torch thread{'s' * (threads > 1)})"


def profile_document(
    engine: LLMEngine, s: dict[str, Any], pf: Fit, dec: DecodeFit, mixed: MixedFit | None, samples: Samples,
    run_s: float,
) -> dict[str, Any]:
    """The profile (load_profile's keys first), then how it was measured."""
    from ecoserve.report import machine_info

    spec, pool = engine.spec, engine.pool
    kv_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * engine.dtype.itemsize
    where = device_description(engine, s["threads"])
    keys, quality = fit_keys(pf, dec, mixed)
    summary = {"run_s": round(run_s, 1), "clock": s["clock"], "cpu_share": s["cpu_share"]} | quality
    return keys | {
        "max_num_tokens": pool.num_blocks * pool.block_size,
        "kv_bytes_per_token": kv_bytes,  # K and V, all layers
        "source": f"fitted by `ecoserve profile` on {where}, {s['clock']} clock",
        "units": _units(dec.context),
        "model": s["model"],
        "model_id": engine.model_id,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": f"{engine.device}: {where}",
        "block_size": pool.block_size,
        "num_blocks": pool.num_blocks,
        "token_budget": s["max_len"],  # the most prompt tokens of a measured prefill batch
        "num_samples": {"prefill": len(samples.prefill), "decode": len(samples.decode), "mixed": len(samples.mixed)},
        "summary": summary,
        "machine": machine_info(),
        "settings": s,
        "samples": {name: [asdict(x) for x in part] for name, part in samples._asdict().items()},
    }


def _fit_mixed(pf: Fit, dec: DecodeFit, mixed: list[MixedSample]) -> MixedFit | None:
    """The mixed-step form for these fits; None with too few mixed samples (the profile then
    takes load_profile's default, "fused")."""
    return fit_mixed(mixed, fitted_profile("measured", pf, dec)) if len(mixed) >= HOLD_OUT_EVERY else None


def fit_keys(pf: Fit, dec: DecodeFit, mixed: MixedFit | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """load_profile's keys for these fits, and their quality for the document's `summary`."""
    keys = {
        "prefill": list(pf.coeffs),
        "decoding_smallbs": list(dec.small.coeffs),
        "decoding_largebs": list(dec.large.coeffs),
        "decoding_large_small_bs_threshold": dec.threshold,
        "decoding_context": dec.context,
    }
    quality: dict[str, Any] = {"decode_threshold": dec.threshold, "decode_context": dec.context}
    for name, fit in (("prefill", pf), ("decoding_smallbs", dec.small), ("decoding_largebs", dec.large)):
        quality[f"{name}_r2"], quality[f"{name}_max_rel_err"] = fit.r2, fit.max_rel_err
        quality[f"{name}_samples"] = fit.num_samples
    if mixed is not None:
        keys["mixed_form"] = quality["mixed_form"] = mixed.form
        for form, err in mixed.held_back.items():
            quality[f"mixed_{form}_held_back_mean_abs_pct"] = round(err.mean_abs_pct, 2)
            quality[f"mixed_{form}_held_back_max_abs_pct"] = round(err.max_abs_pct, 2)
        quality["mixed_held_back_winner"], quality["mixed_held_back_samples"] = mixed.held_back_winner, mixed.num_held_back
    return keys, quality


def _units(context: str) -> str:
    decode = "batch·max(context) and batch" if context == "padded" else "Σ(context) and batch"
    return f"ms; prefill over Σl and Σl² of the prompt lengths, decode over {decode}"


def _context(choice: str) -> str | None:
    return None if choice == "auto" else choice


def refit_profile(args: argparse.Namespace) -> int:
    """`--refit`: the fits of a profile file again, from its own samples."""
    try:
        doc = json.loads(Path(args.refit).expanduser().read_text(encoding="utf-8"))
        samples = Samples([PrefillSample(**x) for x in doc["samples"]["prefill"]],
                          [DecodeSample(**x) for x in doc["samples"]["decode"]],
                          [MixedSample(**x) for x in doc["samples"].get("mixed", [])])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--refit {args.refit}: not a profile written by `ecoserve profile` with its samples ({exc})") from None
    out = writable_json_path(args.out)
    pf, dec = fit_prefill(samples.prefill), fit_decode(samples.decode, args.threshold, _context(args.decode_context))
    mixed = _fit_mixed(pf, dec, samples.mixed)
    keys, quality = fit_keys(pf, dec, mixed)
    doc = keys | {k: v for k, v in doc.items() if k not in keys}
    doc["units"] = _units(dec.context)
    doc["summary"] = dict(doc.get("summary", {})) | quality
    doc.setdefault("settings", {})["refit"] = {"threshold": args.threshold, "decode_context": args.decode_context}
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    title = f"{doc.get('model_id', args.refit)}, refitted from {len(samples.prefill) + len(samples.decode)} samples"
    print_fits(title, pf, dec, mixed)
    print(f"wrote {out}")
    return 0


def print_fits(title: str, pf: Fit, dec: DecodeFit, mixed: MixedFit | None = None) -> None:
    from ecoserve.report import print_table

    rows = []
    t = dec.threshold
    for name, fit in (("prefill", pf), (f"decode < {t}", dec.small), (f"decode >= {t}", dec.large)):
        a, b, c = fit.coeffs
        quality = (f"{fit.r2:.3f}", f"{fit.max_rel_err:.0%}") if fit.num_samples else ("-", "-")
        rows.append((name, f"{a:.3g}", f"{b:.3g}", f"{c:.3g}", *quality, fit.num_samples))
    print_table(title, ["fit", "a ms", "b", "c", "R²", "max err", "n"], rows)
    ctx = "batch·max(ctx)" if dec.context == "padded" else "Σctx"
    print(f"prefill ms = a + b·Σl + c·Σl²; decode ms = a + b·{ctx} + c·batch (below / at or above the threshold)")
    if mixed is not None:
        print_mixed(mixed)


def print_mixed(mixed: MixedFit) -> None:
    from ecoserve.report import print_table

    rows = [
        (form, f"{mixed.chosen_on[form].mean_abs_pct:.1f}%", f"{mixed.held_back[form].mean_abs_pct:.1f}%",
         f"{mixed.held_back[form].max_abs_pct:.1f}%", "chosen" if form == mixed.form else "")
        for form in MIXED_FORMS
    ]
    held, fit_on = mixed.num_held_back, mixed.num_samples - mixed.num_held_back
    print_table(f"mixed steps: {fit_on} choose the form, {held} held back",
                ["form", "mean err (choosing)", "mean err (held back)", "max err (held back)", ""], rows)
    print("additive = prefill step + decode step; fused = the same less the smaller of their fixed costs a "
          "(one pass); err = |predicted - measured| / measured")


def run_profile(args: argparse.Namespace) -> int:
    if args.refit:
        return refit_profile(args)
    start = time.perf_counter()
    s = _settings(args)
    out = writable_json_path(args.out)
    engine = _build_engine(s)
    margin = 2 + engine.pool.block_size  # growth while decoding, block rounding
    capacity = engine.pool.num_blocks * engine.pool.block_size
    grid = make_grid(s["max_len"], s["max_batch"], capacity, min(MIN_LEN, s["max_len"]), margin)
    if not grid.prefill:
        raise ValueError(f"the KV pool ({capacity} tokens) holds no prefill batch of the grid; raise --num-blocks")
    s["clock"] = _clock(s["clock"], engine.device, s["threads"])
    timer = StepTimer(engine, s["threads"], cpu_clock=s["clock"] == "cpu")
    samples = measure(timer, grid, s["repeats"])
    s["cpu_share"] = float(np.median(timer.cpu_shares)) if timer.cpu_shares else None
    if s["clock"] == "wall" and s["cpu_share"] is not None and s["cpu_share"] < 0.8:
        print(
            f"warning: this process ran only {s['cpu_share']:.0%} of the time it was timed (other processes share "
            "the cores), so these wall times are inflated; profile on a quiet machine, or with --threads 1 --clock cpu"
        )
    pf, dec = fit_prefill(samples.prefill), fit_decode(samples.decode, s["threshold"], _context(s["decode_context"]))
    mixed = _fit_mixed(pf, dec, samples.mixed)
    doc = profile_document(engine, s, pf, dec, mixed, samples, time.perf_counter() - start)
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_fits(f"{engine.model_id}, {doc['dtype']}, {doc['device']}", pf, dec, mixed)
    print(f"wrote {out} (KV capacity {doc['max_num_tokens']} tokens; {doc['summary']['run_s']:.0f} s)")
    return 0

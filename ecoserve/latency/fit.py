"""The fitting half of `ecoserve profile` (bench/profile.py measures): DistServe's step-time
form fitted to measured steps, and the grid of batches to measure. numpy only, no torch.

    prefill step (ms) = a + b·Σl + c·Σl²        over the prompt lengths l of the batch
    decode step (ms)  = a + b·Σctx + c·batch    one (a, b, c) below the threshold, one at or above
                   or a + b·batch·max(ctx) + c·batch  ("padded": the torch CPU path pads every
                                                       sequence of a batch to the longest)

The fit is least squares (numpy.linalg.lstsq) of the relative error, since step times span two
orders of magnitude, with every coefficient held >= 0: each subset of the three columns is
solved and the best feasible solution kept, which is the exact non-negative least-squares
optimum for three unknowns. The decode threshold is the measured batch size that gives the
smallest total error over both fits, unless one is given; so is the decode context form.

Mixed steps (a prompt chunk of l tokens prefilled while k requests decode) fit nothing of their
own: each sample is predicted in both forms of `LatencyProfile.mixed_ms` (additive: prefill +
decode step; fused: one pass, one fixed cost) from the pure-step fits. Every 4th sample
(index 3, 7, ...) is held back; the form with the smaller mean |error| / measured over the
others is chosen, and both forms' errors on the held-back ones are reported.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from ecoserve.latency.profile import MIXED_FORMS, LatencyProfile

MIN_LEN = 16  # shortest prompt of the grid


@dataclass(frozen=True)
class Fit:
    """(a, b, c) of one step-time model and how well it fits its samples."""

    coeffs: tuple[float, float, float]
    r2: float  # of the times in ms
    max_rel_err: float  # max |predicted - measured| / measured
    num_samples: int
    sq_rel_err: float  # Σ((predicted - measured) / measured)², what the fit minimises


def fit_step_model(features: np.ndarray, ms: np.ndarray) -> Fit:
    """Non-negative least squares of the relative error of `ms` [n] ≈ `features` [n, 3] @ (a, b, c)."""
    features, ms = np.asarray(features, dtype=np.float64), np.asarray(ms, dtype=np.float64)
    if ms.ndim != 1 or features.shape != (len(ms), 3) or len(ms) < 3 or not (ms > 0).all():
        raise ValueError(f"a fit needs >= 3 positive times and features [n, 3]; got {features.shape}, {ms.shape}")
    # Dividing each row by its time turns the residuals into relative errors.
    xw, yw = features / ms[:, None], np.ones_like(ms)
    best: tuple[float, np.ndarray] | None = None
    for keep in itertools.product((True, False), repeat=3):
        cols = [i for i in range(3) if keep[i]]
        if not cols:
            continue
        sol = np.linalg.lstsq(xw[:, cols], yw, rcond=None)[0]
        if (sol < 0).any():
            continue
        coef = np.zeros(3)
        coef[cols] = sol
        err = float(((xw @ coef - yw) ** 2).sum())
        if best is None or err < best[0] - 1e-12 * max(1.0, err):
            best = (err, coef)
    assert best is not None  # a single column fit with positive data is always feasible
    err, coef = best
    pred = features @ coef
    total = float(((ms - ms.mean()) ** 2).sum())
    r2 = 1.0 - float(((ms - pred) ** 2).sum()) / total if total > 0 else 1.0
    rel = float((np.abs(pred - ms) / ms).max())
    return Fit((float(coef[0]), float(coef[1]), float(coef[2])), r2, rel, len(ms), err)


@dataclass(frozen=True)
class PrefillSample:
    batch: int
    sum_len: int
    sum_len_sq: int
    ms: float  # median step time


@dataclass(frozen=True)
class DecodeSample:
    batch: int
    sum_ctx: int  # Σ(cached tokens + 1) over the batch: the keys its attention reads
    max_ctx: int  # the longest of them (the torch path pads every sequence to it)
    ms: float


@dataclass(frozen=True)
class MixedSample:
    """One step prefilling a prompt chunk while `batch` requests decode (DecodeSample's fields)."""

    sum_len: int  # prompt tokens of the step
    sum_len_sq: int  # Σ n·(s + n) over its chunks of n tokens after s cached ones (l² for a whole prompt)
    batch: int
    sum_ctx: int
    max_ctx: int
    ms: float


@dataclass(frozen=True)
class DecodeFit:
    threshold: int  # batches of this size and more use `large`
    small: Fit
    large: Fit
    context: str = "sum"  # "sum": b·Σctx; "padded": b·batch·max(ctx)


def fit_prefill(samples: Sequence[PrefillSample]) -> Fit:
    x = np.array([[1.0, s.sum_len, s.sum_len_sq] for s in samples]).reshape(-1, 3)
    return fit_step_model(x, np.array([s.ms for s in samples]))


def fit_decode(samples: Sequence[DecodeSample], threshold: int | None = None, context: str | None = None) -> DecodeFit:
    """The two decode fits, split at `threshold`, or at the grid batch size fitting best, with
    the context form `context` ("sum" or "padded"), or the one fitting best (ties: "sum")."""
    if context not in (None, "sum", "padded"):
        raise ValueError(f"the decode context form is 'sum' or 'padded', got {context!r}")
    batches = sorted({s.batch for s in samples})
    # Each side needs two batch sizes, or its c (per request) is not separable from its a.
    candidates = [t for t in batches if sum(b < t for b in batches) >= 2 and sum(b >= t for b in batches) >= 2]
    if threshold is not None:
        if threshold not in candidates and not (threshold > batches[-1] and len(batches) >= 2):
            raise ValueError(
                f"--threshold {threshold} leaves fewer than two measured batch sizes on one side; the decode grid "
                f"has batches {batches}: give one of {candidates or 'none'} or one above {batches[-1]}"
            )
        candidates = [threshold]
    if not candidates:  # too few batch sizes to split: one fit for both sides
        candidates = [batches[-1] + 1]
    forms = [context] if context else ["sum", "padded"]
    fits = [_split_fit(samples, t, form) for form in forms for t in candidates]
    return min(fits, key=lambda f: f.small.sq_rel_err + f.large.sq_rel_err)


def _split_fit(samples: Sequence[DecodeSample], threshold: int, context: str = "sum") -> DecodeFit:
    def fit(part: list[DecodeSample]) -> Fit:
        ctx = [s.batch * s.max_ctx if context == "padded" else s.sum_ctx for s in part]
        x = np.array([[1.0, c, s.batch] for c, s in zip(ctx, part)]).reshape(-1, 3)
        return fit_step_model(x, np.array([s.ms for s in part]))

    small = [s for s in samples if s.batch < threshold]
    large = [s for s in samples if s.batch >= threshold]
    if not large:  # threshold above the grid: the large-batch fit extrapolates the small one
        f = fit(small)
        return DecodeFit(threshold, f, Fit(f.coeffs, f.r2, f.max_rel_err, 0, 0.0), context)
    return DecodeFit(threshold, fit(small), fit(large), context)


HOLD_OUT_EVERY = 4  # every 4th mixed sample is held back from choosing the form


@dataclass(frozen=True)
class FormError:
    mean_abs_pct: float  # mean |predicted - measured| / measured, in %
    max_abs_pct: float


@dataclass(frozen=True)
class MixedFit:
    form: str  # the chosen form (MIXED_FORMS): smaller mean error on the samples not held back
    chosen_on: dict[str, FormError]  # by form, over the samples not held back
    held_back: dict[str, FormError]  # by form, over every HOLD_OUT_EVERY-th sample
    num_samples: int
    num_held_back: int

    @property
    def held_back_winner(self) -> str:
        return min(MIXED_FORMS, key=lambda f: self.held_back[f].mean_abs_pct)


def fit_mixed(samples: Sequence[MixedSample], profile: LatencyProfile) -> MixedFit:
    """Both mixed forms of `profile` (its prefill and decode fits) against the measured mixed
    steps; ties go to "fused", the DESIGN §7 default. Needs HOLD_OUT_EVERY samples or more."""
    if len(samples) < HOLD_OUT_EVERY:
        raise ValueError(f"choosing the mixed-step form needs >= {HOLD_OUT_EVERY} mixed samples, got {len(samples)}")
    held = [i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 for i in range(len(samples))]
    errors: dict[str, tuple[FormError, FormError]] = {}
    for form in MIXED_FORMS:
        prof = dataclasses.replace(profile, mixed_form=form)
        pred = np.array([prof.mixed_ms(s.sum_len, s.sum_len_sq, s.batch, s.sum_ctx, s.max_ctx) for s in samples])
        ms = np.array([s.ms for s in samples])
        rel = np.abs(pred - ms) / ms * 100
        mask = np.array(held)
        errors[form] = (_form_error(rel[~mask]), _form_error(rel[mask]))
    chosen = min(MIXED_FORMS, key=lambda f: errors[f][0].mean_abs_pct)  # MIXED_FORMS[0] is "fused"
    return MixedFit(
        chosen, {f: e[0] for f, e in errors.items()}, {f: e[1] for f, e in errors.items()}, len(samples), sum(held),
    )


def _form_error(rel_pct: np.ndarray) -> FormError:
    return FormError(float(rel_pct.mean()), float(rel_pct.max()))


def fitted_profile(name: str, pf: Fit, dec: DecodeFit, mixed_form: str = "fused") -> LatencyProfile:
    """The LatencyProfile these fits make (no capacity): what the mixed forms are evaluated with."""
    return LatencyProfile(name, pf.coeffs, dec.small.coeffs, dec.large.coeffs, dec.threshold,
                          decode_context=dec.context, mixed_form=mixed_form)


# --- the grid --------------------------------------------------------------------------------


class MixedPoint(NamedTuple):
    decode: list[int]  # tokens already cached for each decoding sequence
    chunk: int  # tokens of the prompt prefilled in the same step


@dataclass(frozen=True)
class Grid:
    prefill: list[list[int]]  # prompt lengths of each batch
    decode: list[list[int]]  # tokens already cached for each sequence of each batch
    mixed: list[MixedPoint] = field(default_factory=list)


def make_grid(max_len: int, max_batch: int, capacity: int, min_len: int = MIN_LEN, margin: int = 0) -> Grid:
    """Prefill: every doubling length alone, every other one in a batch filling `max_len`
    tokens, and one batch of halving lengths. Decode: batch 1, 2, 4 .. `max_batch` at contexts
    of max_len/16, /4 and /1, uniform and spread, each batch within the KV `capacity` with
    `margin` tokens per sequence to grow into."""
    lens = [min(max_len, min_len << i) for i in range((max(max_len // min_len, 1)).bit_length() + 1)]
    lens = sorted(set(lens))
    prefill = [[n] for n in lens]
    prefill += [[n] * min(max_batch, max_len // n) for n in lens[::2] if min(max_batch, max_len // n) > 1]
    halving = [max_len >> i for i in range(1, len(lens)) if max_len >> i >= min_len]
    if len(halving[:max_batch]) > 1:
        prefill.append(halving[:max_batch])
    batches = sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)})
    decode: list[list[int]] = []
    for b in batches:
        for ctx in sorted({max(1, max_len // 16), max(1, max_len // 4), max_len}):
            ctx = min(ctx, capacity // b - margin)
            if ctx < 1:
                continue
            shapes = [[ctx] * b] + ([[max(1, ctx * (i + 1) // b) for i in range(b)]] if b >= 4 else [])
            decode += [s for s in shapes if s not in decode]
    return Grid([p for p in prefill if sum(p) <= capacity], decode, _mixed_grid(max_len, max_batch, capacity, min_len, margin))


def _mixed_grid(max_len: int, max_batch: int, capacity: int, min_len: int, margin: int) -> list[MixedPoint]:
    """k = 1, 4, 16 .. `max_batch` decoding requests at contexts max_len/4 and max_len, each with
    a prompt chunk of min_len, max_len/4 and max_len tokens; within the pool like the decodes.
    Sorted by (k, context, chunk), so every 4th point (held back) falls across the grid."""
    batches = sorted({min(max_batch, 4**i) for i in range(max(1, max_batch).bit_length())} | {max_batch})
    chunks = sorted({min_len, max(min_len, max_len // 4), max_len})
    out: list[MixedPoint] = []
    for k in batches:
        for ctx in sorted({max(1, max_len // 4), max_len}):
            for n in chunks:
                ctx_k = min(ctx, (capacity - n - margin) // k - margin)
                point = MixedPoint([ctx_k] * k, n)
                if ctx_k >= 1 and point not in out:
                    out.append(point)
    return out

"""Step-time models of one worker, in DistServe's form, from the bundled profiles.

    prefill step (ms) = a + b·Σl + c·Σl²       over the prompt lengths l of the batch
    decode step (ms)  = a + b·Σctx + c·batch   (one (a, b, c) below `large_batch_threshold`
                                                requests, another at or above it)

A profile is named `<model>-tp<N>` (DistServe's fits of its own engine, e.g. `opt-13b-tp1`) or
`vllm-<model>-tp<N>` (its fits of the vLLM baseline), or is a JSON file holding one profile:
`{"prefill": [a, b, c], "decoding_smallbs": [a, b, c], "decoding_largebs": [a, b, c],
"decoding_large_small_bs_threshold": 95, "max_num_tokens": 66144, "kv_bytes_per_token": 819200,
"decoding_context": "sum", "mixed_form": "fused"}` (the last four keys optional; any others are ignored).
`max_num_tokens` is the KV capacity DistServe measured for that model and degree (pipeline
degree 1), or the pool of the worker a fitted profile was measured on (`ecoserve profile`);
`kv_bytes_per_token` its K and V bytes per token over all layers. `decoding_context` "padded"
(ours, for engines that pad a decode batch to its longest sequence, as our CPU path does)
replaces Σctx by batch·max(ctx) in the decode form; "sum", DistServe's, is the default.

A step that mixes prompt tokens and decodes (a colocated worker's chunked prefill) costs
`mixed_ms`, by the profile's `mixed_form`:

    additive: prefill_ms + decode_ms                      two passes, two fixed costs
    fused:    prefill_ms + decode_ms - min(a_p, a_d)      one pass: it pays the larger of the
                                                         two fixed costs once
where a_p is the prefill fit's a and a_d the a of the decode fit at the step's batch size. A
profile `ecoserve profile` measured says which form its mixed steps fitted better
(`"mixed_form"`, chosen in latency/fit.py); a profile without the key, like DistServe's A100
fits (nothing mixed was measured), is "fused", the DESIGN §7 default: one forward pass reads
the weights once. No torch here: the coordinator, the CLI and the simulator use it too.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = "opt-13b-tp1"
DECODE_CONTEXTS = ("sum", "padded")
MIXED_FORMS = ("fused", "additive")
_FITS = {"": "distserve-profiler-a100-80g.distserve.json", "vllm-": "distserve-profiler-a100-80g.vllm.json"}
_CAPACITY_FILE = "distserve-max_num_tokens.csv"
# Profiles we fitted from our own engine with `ecoserve profile`, bundled as files, by name.
# They are named without "-tp<N>", so the DistServe names (`profile_names`) stay what the
# simulator's model/TP lookup parses.
FITTED_PROFILES = {"cpu-smollm2-135m": "cpu-smollm2-135m.json"}


@dataclass(frozen=True)
class LatencyProfile:
    """Step-time coefficients of one model on one tensor-parallel group, in milliseconds."""

    name: str
    prefill: tuple[float, float, float]  # (a, b, c): a + b·Σl + c·Σl²
    decode_small: tuple[float, float, float]  # (a, b, c): a + b·Σctx + c·batch, batch < threshold
    decode_large: tuple[float, float, float]  # the same, batch >= threshold
    large_batch_threshold: int
    max_num_tokens: int | None = None  # KV capacity in tokens, when the source gives one
    kv_bytes_per_token: int | None = None  # K and V, all layers, when the source gives it
    decode_context: str = "sum"  # "sum": b·Σctx; "padded": b·batch·max(ctx) (DECODE_CONTEXTS)
    mixed_form: str = "fused"  # a step holding prompt tokens and decodes: MIXED_FORMS, see mixed_ms

    def prefill_ms(self, sum_len: int, sum_len_sq: int) -> float:
        """A prefill batch with Σl = `sum_len` and Σl² = `sum_len_sq`; 0 for an empty one."""
        if sum_len == 0:
            return 0.0
        a, b, c = self.prefill
        return a + b * sum_len + c * sum_len_sq

    def decode_ms(self, batch: int, sum_context: float, max_context: int | None = None) -> float:
        """A decode step over `batch` requests holding `sum_context` tokens, the longest
        `max_context` (which a "padded" profile needs); 0 for an empty one."""
        if batch == 0:
            return 0.0
        a, b, c = self.decode_large if batch >= self.large_batch_threshold else self.decode_small
        if self.decode_context == "padded":
            if max_context is None:
                raise ValueError(f"profile {self.name} models padded decode batches: give the longest context too")
            return a + b * batch * max_context + c * batch
        return a + b * sum_context + c * batch

    def mixed_ms(
        self, sum_len: int, sum_len_sq: int, batch: int, sum_context: float, max_context: int | None = None,
    ) -> float:
        """A step prefilling Σl = `sum_len`, Σl² = `sum_len_sq` prompt tokens (prefill_ms) while
        decoding `batch` requests (decode_ms's arguments). "additive": the sum of the two steps;
        "fused": one pass, so the smaller of the two fixed costs is not paid (the module
        docstring). With one side empty it is the other side's step, in either form."""
        prefill, decode = self.prefill_ms(sum_len, sum_len_sq), self.decode_ms(batch, sum_context, max_context)
        if self.mixed_form == "additive" or not (sum_len and batch):
            return prefill + decode
        a_decode = (self.decode_large if batch >= self.large_batch_threshold else self.decode_small)[0]
        return prefill + decode - min(self.prefill[0], a_decode)

    def prompt_budget(
        self, target_ms: float, batch: int, sum_context: float, max_context: int | None = None, cap: int = 1 << 20,
        done: int = 0,
    ) -> int:
        """The most prompt tokens (0..`cap`) a step decoding `batch` requests may add and still be
        predicted (`mixed_ms`, the prompt tokens taken as one chunk: Σl² = Σl², the costliest
        split; `done` tokens of the prompt they continue are already computed, and every new
        query attends to them too: Σl² gains n·done, an upper bound where later prompts start
        fresh) to take at most `target_ms`: EcoServe's SLO-derived prompt budget (DESIGN §4.1).
        `cap` when nothing decodes; 0 when the decodes alone already take more than `target_ms`."""
        def ms(n: int) -> float:
            return self.mixed_ms(n, n * n + n * done, batch, sum_context, max_context)

        if batch == 0 or cap <= 0:
            return max(0, cap)  # nothing decodes: no TPOT to keep
        if ms(0) > target_ms:
            return 0
        if ms(cap) <= target_ms:
            return cap
        lo, hi = 0, cap  # ms(lo) within the target (or lo == 0), ms(hi) over it; ms grows with n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ms(mid) <= target_ms:
                lo = mid
            else:
                hi = mid
        return lo


def profile_names() -> list[str]:
    """Every bundled DistServe profile name (`<model>-tp<N>`, `vllm-<model>-tp<N>`); our own
    fits are `FITTED_PROFILES`."""
    return sorted(_bundled())


def load_profile(name_or_path: str) -> LatencyProfile:
    """A bundled profile by name (DistServe's, or one of `FITTED_PROFILES`), or a profile JSON
    file; ValueError naming what is allowed."""
    bundled = _bundled()
    if name_or_path in bundled:
        return bundled[name_or_path]
    if name_or_path in FITTED_PROFILES:
        return _fitted(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"latency profile {path} is not valid JSON: {exc}") from None
        return _profile(path.stem, raw, raw.get("max_num_tokens") if isinstance(raw, dict) else None, str(path))
    raise ValueError(
        f"unknown latency profile {name_or_path!r}: give one of {', '.join(profile_names() + sorted(FITTED_PROFILES))} "
        "or the path of a .json file with prefill, decoding_smallbs, decoding_largebs and "
        "decoding_large_small_bs_threshold"
    )


@lru_cache(maxsize=1)
def _bundled() -> dict[str, LatencyProfile]:
    folder = resources.files("ecoserve.data").joinpath("profiles")
    capacity: dict[tuple[str, int], int] = {}
    for row in csv.DictReader(io.StringIO(folder.joinpath(_CAPACITY_FILE).read_text(encoding="utf-8"))):
        if int(row["pp"]) == 1:
            capacity[(row["model"], int(row["tp"]))] = int(row["max_num_tokens"])
    out: dict[str, LatencyProfile] = {}
    for prefix, filename in _FITS.items():
        fits: dict[str, dict[str, Any]] = json.loads(folder.joinpath(filename).read_text(encoding="utf-8"))
        for model, by_tp in fits.items():
            for tp, raw in by_tp.items():
                name = f"{prefix}{model.rsplit('/', 1)[-1]}-tp{tp}"
                out[name] = _profile(name, raw, capacity.get((model, int(tp))), f"{filename} [{model}][{tp}]")
    return out


@lru_cache(maxsize=None)
def _fitted(name: str) -> LatencyProfile:
    text = resources.files("ecoserve.data").joinpath("profiles", FITTED_PROFILES[name]).read_text(encoding="utf-8")
    raw = json.loads(text)
    return _profile(name, raw, raw.get("max_num_tokens"), FITTED_PROFILES[name])


def _profile(name: str, raw: Any, max_num_tokens: Any, source: str) -> LatencyProfile:
    keys = ("prefill", "decoding_smallbs", "decoding_largebs")
    missing = [k for k in keys + ("decoding_large_small_bs_threshold",) if not isinstance(raw, dict) or k not in raw]
    if missing:
        lacks = f"lacks {', '.join(missing)}" if isinstance(raw, dict) else "is not a JSON object"
        raise ValueError(
            f"latency profile {source} {lacks}: it must be a JSON object with {', '.join(keys)} (each [a, b, c]) "
            "and decoding_large_small_bs_threshold"
        )
    coeffs = []
    for key in keys:
        value = raw[key]
        if not (isinstance(value, list) and len(value) == 3 and all(_finite(v) for v in value)):
            raise ValueError(f"latency profile {source}: {key} must be three finite numbers [a, b, c], got {value!r}")
        coeffs.append((float(value[0]), float(value[1]), float(value[2])))
    threshold = raw["decoding_large_small_bs_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"latency profile {source}: decoding_large_small_bs_threshold must be an integer >= 1")
    kv_bytes = raw.get("kv_bytes_per_token")
    for key, value in (("max_num_tokens", max_num_tokens), ("kv_bytes_per_token", kv_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"latency profile {source}: {key} must be an integer >= 1 or absent, got {value!r}")
    context = raw.get("decoding_context", "sum")
    if context not in DECODE_CONTEXTS:
        raise ValueError(f"latency profile {source}: decoding_context must be one of {DECODE_CONTEXTS}, got {context!r}")
    mixed = raw.get("mixed_form", "fused")
    if mixed not in MIXED_FORMS:
        raise ValueError(f"latency profile {source}: mixed_form must be one of {MIXED_FORMS} or absent, got {mixed!r}")
    return LatencyProfile(name, coeffs[0], coeffs[1], coeffs[2], threshold, max_num_tokens, kv_bytes, context, mixed)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

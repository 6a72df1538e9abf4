"""Hand-made client frames for the front-door tests: a valid AddRequest and ways to break it."""

from __future__ import annotations

import msgpack

VALID_PARAMS = dict(max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, seed=None, stop_token_ids=[], ignore_eos=True)
VALID = dict(request_id="ok", prompt=None, prompt_token_ids=[1, 2, 3], params=VALID_PARAMS, slo=None, stream=False)
FIELDS = sorted(VALID) + sorted(VALID_PARAMS)  # every field a frame can break, nested ones included


def add(**overrides: object) -> bytes:
    """An AddRequest frame with fields replaced: a SamplingParams field's name replaces it inside
    `params`, `slo_ttft_ms` / `slo_tpot_ms` set `slo`, any other name a top-level field."""
    fields: dict[str, object] = {**VALID, "params": dict(VALID_PARAMS)}
    slo: dict[str, object] = {}
    for name, value in overrides.items():
        if name in VALID_PARAMS:
            fields["params"][name] = value  # type: ignore[index]
        elif name in ("slo_ttft_ms", "slo_tpot_ms"):
            slo[name.removeprefix("slo_")] = value
        else:
            fields[name] = value
    if slo:
        fields["slo"] = {"ttft_ms": None, "tpot_ms": None, **slo}
    return msgpack.packb(["AddRequest", fields], use_bin_type=True)

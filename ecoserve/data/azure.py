"""Replay the bundled Azure LLM inference traces 2023 (CC-BY 4.0; see traces/README.md)."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Iterator

from ecoserve.data.workload import WorkloadRequest, check_limit

TRACE_FILES: dict[str, str] = {
    "conv": "azure_llm_2023_conv.csv",
    "code": "azure_llm_2023_code.csv",
}
_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_azure_trace(
    kind: str = "conv", limit: int | None = None, path: str | Path | None = None
) -> list[WorkloadRequest]:
    """The first `limit` rows (all when None) of the `kind` trace, with arrivals in seconds
    after the first row. Prompt text is not part of the trace, so `prompt` is None.

    `path` reads a CSV in the same format (TIMESTAMP,ContextTokens,GeneratedTokens) instead of
    the bundled file; `kind` is then ignored.
    """
    check_limit(limit)
    rows = _read_rows(kind, path)
    requests: list[WorkloadRequest] = []
    t0_ns: int | None = None
    for row in rows:
        if limit is not None and len(requests) >= limit:
            break
        t_ns = parse_timestamp_ns(row[0])
        t0_ns = t_ns if t0_ns is None else t0_ns
        requests.append(
            WorkloadRequest(
                arrival_s=(t_ns - t0_ns) / 1e9, prompt_len=int(row[1]), output_len=int(row[2])
            )
        )
    return requests


def parse_timestamp_ns(text: str) -> int:
    """Nanoseconds since the Unix epoch (timestamps are naive; only differences matter) of a
    trace timestamp such as ``2023-11-16 18:17:03.9799600``.

    The trace has 7 fractional digits, which `datetime.fromisoformat` rejects before Python
    3.11 and truncates to microseconds after, so the fraction is parsed on its own. Integer
    nanoseconds keep all 7 digits; a float of epoch seconds would round away the last one.
    """
    whole, _, frac = text.strip().partition(".")
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds in trace timestamp {text!r}")
    try:
        # Read as UTC so that no local daylight-saving shift lands between two rows.
        seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    except ValueError as err:
        raise ValueError(
            f"trace timestamp {text!r} is not 'YYYY-MM-DD HH:MM:SS[.fraction]'"
        ) from err
    return seconds * 1_000_000_000 + int(frac[:9].ljust(9, "0") or "0")


def _read_rows(kind: str, path: str | Path | None = None) -> Iterator[list[str]]:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"trace file {path} does not exist (expected an Azure-format CSV)")
        name, text = str(path), Path(path).read_text(encoding="utf-8")
    elif kind not in TRACE_FILES:
        allowed = ", ".join(repr(k) for k in TRACE_FILES)
        raise ValueError(f"unknown Azure trace kind {kind!r}; allowed: {allowed}")
    else:
        name = TRACE_FILES[kind]
        text = resources.files("ecoserve.data").joinpath("traces", name).read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text))
    header = tuple(next(reader, ()))
    if header != _COLUMNS:
        raise ValueError(f"{name}: expected header {','.join(_COLUMNS)}, got {','.join(header)}")
    return (row for row in reader if row)

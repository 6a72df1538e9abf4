"""Shared benchmark plumbing: machine description, tables on the terminal, JSON results.

Every benchmark writes JSON whose top level holds a flat `summary` of the figures its issue
names, plus `machine` and `settings` describing how they were measured.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col != columns[0] else "left")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    Console().print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def write_json(path: str | Path, summary: dict[str, Any], settings: dict[str, Any], **details: Any) -> None:
    """Write {summary, machine, settings, **details}; `summary` must be flat (no nesting)."""
    nested = [k for k, v in summary.items() if isinstance(v, (dict, list))]
    if nested:
        raise ValueError(f"summary must be flat; these keys hold containers: {nested}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"summary": summary, "machine": machine_info(), "settings": settings, **details}
    path.write_text(json.dumps(doc, indent=2) + "\n")

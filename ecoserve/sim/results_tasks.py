"""The searches behind `ecoserve bench results`, run on worker processes, and the cache that lets
an interrupted run resume.

What a worker runs (and so what a kept result depends on) is here and in the modules this one
imports; the command, its tables and plots are in `results.py` and may change without voiding
kept searches.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, is_dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ecoserve.config import ClusterShape
from ecoserve.data.synthetic import with_arrivals
from ecoserve.data.workload import WorkloadRequest
from ecoserve.sim.experiment import Layout, RunMetrics, Search, goodput, min_gpus, model_tps
from ecoserve.sim.specs import Spread
from ecoserve.sim.workloads import MAX_TOTAL_LEN

# The command's own modules (arguments, orchestration, tables): a search's figures depend on them
# only through its arguments, which key the cache.
_PRESENTATION = frozenset({"ecoserve.cli", "ecoserve.sim.commands", "ecoserve.sim.results"})


class SearchCache:
    """Finished searches kept on disk, so an interrupted `bench results` resumes where it stopped.

    An entry is keyed by the function and its arguments (their `repr`: dataclasses of plain
    values), and records the content hash of every `ecoserve` source file that was loaded when it
    was computed, and of the bundled data (profiles, traces, length tables). It is reused only
    when the arguments are equal and every one of those files and the data are unchanged, so a
    reused figure is one this code would compute again (every run is deterministic); anything
    else is computed afresh and overwrites it. `None` disables it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reused_s = 0.0  # compute time the reused entries took when they were made
        self.reused = 0

    @staticmethod
    def key(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
        return f"{fn.__module__}.{fn.__qualname__}{args!r}"

    def get(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
        key = self.key(fn, args)
        path = self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        try:
            entry = json.loads(path.read_text())
            if entry["key"] != key or entry["data"] != _data_digest() or entry["sources"] != _file_hashes(entry["sources"]):
                return False, None
            result = _from_json(entry["result"])
        except (OSError, ValueError, KeyError, TypeError):
            return False, None
        self.reused += 1
        self.reused_s += entry["seconds"]
        return True, result

    def put(self, fn: Callable[..., Any], args: tuple[Any, ...], result: Any, sources: dict[str, str], seconds: float) -> None:
        key = self.key(fn, args)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "data": _data_digest(), "sources": sources, "seconds": seconds,
                                   "result": _to_json(result)}))
        tmp.replace(path)


# What a kept result may hold: plain values and these dataclasses, as JSON (nothing is unpickled).
_KEPT_TYPES: dict[str, type] = {cls.__name__: cls for cls in (Layout, ClusterShape, RunMetrics, Spread)}


def _to_json(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        if type(x).__name__ not in _KEPT_TYPES:
            raise TypeError(f"the results cache cannot keep a {type(x).__name__}")
        return {"__type__": type(x).__name__, **{f.name: _to_json(getattr(x, f.name)) for f in fields(x)}}
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise TypeError("the results cache keeps dicts with string keys only")
        return {"__dict__": {k: _to_json(v) for k, v in x.items()}}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"the results cache cannot keep a {type(x).__name__}")


def _from_json(x: Any) -> Any:
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    if isinstance(x, dict):
        if "__tuple__" in x:
            return tuple(_from_json(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {k: _from_json(v) for k, v in x["__dict__"].items()}
        cls = _KEPT_TYPES[x["__type__"]]
        return cls(**{k: _from_json(v) for k, v in x.items() if k != "__type__"})
    return x


_PKG = Path(__file__).resolve().parent.parent


def _file_hashes(names: Any) -> dict[str, str]:
    """`{path relative to the package: sha256}` for these files as they are now ('' if gone)."""
    out = {}
    for rel in names:
        try:
            out[rel] = hashlib.sha256((_PKG / rel).read_bytes()).hexdigest()
        except OSError:
            out[rel] = ""
    return out


def _loaded_sources() -> dict[str, str]:
    """The hashes of every `ecoserve` source file loaded in this process."""
    files = set()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if name.split(".")[0] == "ecoserve" and f and name not in _PRESENTATION:
            try:
                files.add(str(Path(f).resolve().relative_to(_PKG)))
            except ValueError:
                continue
    return _file_hashes(sorted(files))


def _data_digest() -> str:
    h = hashlib.sha256()
    for f in sorted((_PKG / "data").rglob("*")):
        if f.is_file() and f.suffix not in (".py", ".pyc"):
            h.update(str(f.relative_to(_PKG)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, str] | None, float]:
    """`fn(*args)`, the sources loaded when it finished (None when a file this process had loaded
    has changed on disk since: which version ran is then unknown, and the result is not kept), and
    its compute time. Runs in a worker."""
    before = {**_loaded_sources(), **_AT_IMPORT}  # what was on disk when this process loaded it
    t0 = time.perf_counter()
    res = fn(*args)
    seconds = time.perf_counter() - t0
    after = _loaded_sources()
    changed = any(after.get(f, h) != h for f, h in before.items())
    return res, None if changed else after, seconds


def pmap(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], jobs: int, bar: Any,
          cache: SearchCache | None = None) -> list[Any]:
    """`[fn(*c) for c in calls]`, on `jobs` processes when more than one (each run is
    deterministic, so the figures do not depend on `jobs`), each finished call kept in `cache`."""
    out: list[Any] = [None] * len(calls)
    todo = []
    for i, c in enumerate(calls):
        hit, res = cache.get(fn, c) if cache else (False, None)
        if hit:
            out[i] = res
            bar.update(1)
        else:
            todo.append(i)

    def done(i: int, got: tuple[Any, dict[str, str] | None, float]) -> None:
        out[i], sources, seconds = got
        if cache and sources is not None:
            cache.put(fn, calls[i], out[i], sources, seconds)
        bar.update(1)

    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            done(i, _timed(fn, *calls[i]))
        return out
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=get_context("spawn")) as ex:
        futures = {ex.submit(_timed, fn, *calls[i]): i for i in todo}
        for f in as_completed(futures):
            done(futures[f], f.result())
    return out


def unit_goodput(search: Search) -> float:
    tp = model_tps(search.model)[0]
    return goodput(search, Layout("distserve", ClusterShape(1, tp, 1, tp)), rel_tol=0.1)[0]


def gpu_sweep(search: Search, policy: str, rates: Sequence[float], max_gpus: int) -> list[tuple[Layout | None, RunMetrics | None]]:
    """`min_gpus` at each rate, lowest first, a layout that failed a lower rate not tried again."""
    failed: list[Layout] = []
    return [min_gpus(search, policy, rate, max_gpus, failed=failed)[:2] for rate in rates]


def goodput_of(search: Search, layout: Layout, rel_tol: float) -> float:
    return goodput(search, layout, rel_tol=rel_tol)[0]


def attainment_at(search: Search, layout: Layout, rate: float) -> RunMetrics | None:
    return search.attainment(layout, rate) if 0 < rate < math.inf else None


class NullBar:
    def update(self, _: int) -> None:
        pass


@dataclass
class TextSearch(Search):
    """ShareGPT's held-out test conversations (never used to train or choose the predictor),
    cycled to the workload's size, with their prompt token ids."""

    test: Any = field(default=None, repr=False)  # the conversations: named by `test_limit` in the key
    test_limit: int | None = None  # how many were loaded (None: all): with the code, what `test` holds

    def requests(self, rate: float) -> list[WorkloadRequest]:
        n = max(self.num_requests, math.ceil(rate * self.min_duration_s))
        base = [WorkloadRequest(0.0, len(p), int(o)) for p, o in zip(self.test.prompts, self.test.output_lens)
                if len(p) + int(o) <= MAX_TOTAL_LEN]
        return with_arrivals([base[i % len(base)] for i in range(n)], rate, seed=self.seed)

    def prompts(self, n: int) -> list[list[int]]:
        base = [p.tolist() for p, o in zip(self.test.prompts, self.test.output_lens) if len(p) + int(o) <= MAX_TOTAL_LEN]
        return [base[i % len(base)] for i in range(n)]


# The simulator's sources as this process loaded them (importing this module loads them).
_AT_IMPORT = _loaded_sources()

"""`bench results` keeps finished searches so an interrupted run resumes: an entry is reused only
for equal arguments with every simulator source it was computed with unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from ecoserve.config import ClusterShape
from ecoserve.sim.experiment import SLO, Layout, Search
from ecoserve.sim.results_tasks import NullBar, SearchCache, attainment_at, pmap


def _calls() -> list[tuple[Search, Layout, float]]:
    search = Search("opt-13b", "sharegpt", SLO(250, 100), num_requests=60, min_duration_s=5)
    return [(search, Layout("distserve", ClusterShape(1, 1, 1, 1)), rate) for rate in (2.0, 4.0)]


def test_a_second_run_reuses_every_search_and_gets_the_same_figures(tmp_path: Path) -> None:
    first = pmap(attainment_at, _calls(), 1, NullBar(), SearchCache(tmp_path))
    assert len(list(tmp_path.glob("*.json"))) == 2
    again = SearchCache(tmp_path)
    second = pmap(attainment_at, _calls(), 1, NullBar(), again)
    assert again.reused == 2 and again.reused_s > 0
    assert [m.row() for m in second] == [m.row() for m in first]
    other = SearchCache(tmp_path)  # different arguments: computed, not confused with the kept ones
    pmap(attainment_at, [(s, lay, 3.0) for s, lay, _ in _calls()[:1]], 1, NullBar(), other)
    assert other.reused == 0 and len(list(tmp_path.glob("*.json"))) == 3


def test_an_entry_made_by_other_sources_is_computed_afresh(tmp_path: Path) -> None:
    pmap(attainment_at, _calls(), 1, NullBar(), SearchCache(tmp_path))
    path = sorted(tmp_path.glob("*.json"))[0]
    entry = json.loads(path.read_text())
    assert "sim/simulator.py" in entry["sources"] and "coordinator/policies/ecoserve/policy.py" in entry["sources"]
    entry["sources"]["sim/simulator.py"] = "0" * 64  # as if the simulator had changed since
    path.write_text(json.dumps(entry))
    cache = SearchCache(tmp_path)
    pmap(attainment_at, _calls(), 1, NullBar(), cache)
    assert cache.reused == 1  # the other entry still holds
    assert json.loads(path.read_text())["sources"]["sim/simulator.py"] != "0" * 64  # recomputed and kept


def test_a_damaged_entry_is_computed_afresh(tmp_path: Path) -> None:
    pmap(attainment_at, _calls()[:1], 1, NullBar(), SearchCache(tmp_path))
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    cache = SearchCache(tmp_path)
    (m,) = pmap(attainment_at, _calls()[:1], 1, NullBar(), cache)
    assert cache.reused == 0 and m is not None


def test_the_command_s_own_modules_do_not_key_a_search_and_the_simulator_s_do(tmp_path: Path) -> None:
    import ecoserve.cli  # noqa: F401  (loaded, as in every run of the command)
    from ecoserve.sim import results_tasks

    sources = results_tasks._loaded_sources()
    assert "cli.py" not in sources and "sim/results.py" not in sources and "sim/commands.py" not in sources
    assert {"sim/simulator.py", "sim/experiment.py", "sim/results_tasks.py", "latency/cost.py"} <= set(sources)


def test_a_source_edited_after_the_process_loaded_it_keeps_nothing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ecoserve.sim import results_tasks

    monkeypatch.setitem(results_tasks._AT_IMPORT, "sim/simulator.py", "0" * 64)  # loaded before an edit
    cache = SearchCache(tmp_path)
    (m,) = pmap(attainment_at, _calls()[:1], 1, NullBar(), cache)
    assert m is not None and not list(tmp_path.glob("*.json"))


def test_every_kind_of_result_a_search_returns_comes_back_equal() -> None:
    from ecoserve.sim.results_tasks import _from_json, _to_json
    from ecoserve.sim.specs import Spread

    (search, lay, rate), = _calls()[:1]
    m = attainment_at(search, lay, rate)
    for value in (3.5, float("inf"), [(lay, m), (None, None)], (lay, Spread((1.0, 2.5)), {"2x TP1": {"mean": 1.0}}), m):
        assert _from_json(json.loads(json.dumps(_to_json(value)))) == value

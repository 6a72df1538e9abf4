"""`ecoserve bench soak` on simulated workers: 20 s of open-loop load on 2 prefill + 3 decode
workers with one SIGKILLed every 8 s. Every request ends exactly once, none is lost, and the
block accounting returns to zero."""

from __future__ import annotations

from pathlib import Path

from ecoserve.bench.soak import SoakConfig, run_soak
from ecoserve.cli import main


def test_soak_with_workers_killed_loses_no_request_and_leaks_no_block(tmp_path: Path) -> None:
    report = run_soak(SoakConfig(duration_s=20, engine="sim", kill_every_s=8, grace_s=20), log_dir=tmp_path)
    s = report["summary"]
    assert s["served"] > 0 and s["lost"] == 0 and s["leaked_blocks"] == 0 and s["broken_streams"] == 0, s
    assert s["served"] + s["errored"] == s["sent"] == s["server_ended"], "the coordinator ended each request once"
    # Due at 8 s and 16 s: a decode worker (3 alive), then a prefill one (2 each); neither is the last of its role.
    assert s["workers_killed"] == 2 and s["workers_lost"] == 2, report["killed"]
    survivors = [m for m in report["memory"].values() if m["rss_end_mb"] is not None]
    assert len(survivors) == 1 + 5 - s["workers_killed"], "the coordinator and every surviving worker are sampled"


def test_soak_refuses_a_cluster_without_both_roles(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "soak", "--duration", "5", "--decode", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "a soak needs at least 1 prefill and 1 decode worker, got 2 + 0" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_a_burst_soak_loses_no_request_and_leaks_no_block(tmp_path: Path) -> None:
    """400 requests at once (the prefill pools hold a few dozen prompts) on top of 5 requests/s."""
    report = run_soak(SoakConfig(duration_s=12, engine="sim", rate=5.0, burst=400, grace_s=60), log_dir=tmp_path)
    s = report["summary"]
    assert s["burst_sent"] == 400 and s["sent"] > 400, s
    assert s["lost"] == 0 and s["leaked_blocks"] == 0 and s["broken_streams"] == 0 and s["errored"] == 0, s
    assert s["served"] == s["sent"] == s["server_ended"] and s["transfers_failed"] == 0, s

"""`bench engine --against vllm`'s own logic (vLLM itself never runs in CI): the interpreter
check, the identical-output count and the request file vLLM's side reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ecoserve.bench.against_vllm import SideBySide, check_vllm_python, identical_outputs, write_requests
from ecoserve.bench.engine import Workload


def test_vllm_python_must_be_given_and_executable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --vllm-python PATH"):
        check_vllm_python(None)
    with pytest.raises(ValueError, match="is not an executable file"):
        check_vllm_python(str(tmp_path / "nope"))
    assert check_vllm_python(sys.executable) == sys.executable


def test_identical_outputs_counts_whole_requests() -> None:
    assert identical_outputs([[1, 2], [3, 4], [5]], [[1, 2], [3, 9], [5]]) == 2
    with pytest.raises(ValueError, match="returned 2 and 1 outputs"):
        identical_outputs([[1], [2]], [[1]])


def test_request_file_and_ratio(tmp_path: Path) -> None:
    work = Workload(prompts=[[1, 2, 3], [4]], output_lens=[5, 7])
    path = tmp_path / "r.json"
    write_requests(path, work)
    assert json.loads(path.read_text()) == {"prompts": [[1, 2, 3], [4]], "output_lens": [5, 7]}
    r = SideBySide("float32", vllm_s=2.0, ecoserve_s=4.0, output_tokens=12, num_identical=1, num_requests=2, vllm_info={})
    assert (r.vllm_tok_s, r.ecoserve_tok_s, r.ratio, r.identical_share) == (6.0, 3.0, 0.5, 0.5)


def test_rounds_take_medians_and_the_ratio_pair_by_pair() -> None:
    from ecoserve.bench.against_vllm import Rounds

    def side(vllm_s: float, ours_s: float, identical: int) -> SideBySide:
        return SideBySide("bfloat16", vllm_s=vllm_s, ecoserve_s=ours_s, output_tokens=120, num_identical=identical,
                          num_requests=4, vllm_info={})

    # The machine slows down between rounds: each pair is 1.0x, the medians of each side are not.
    r = Rounds("bfloat16", [side(1.0, 1.0, 3), side(2.0, 2.0, 2), side(4.0, 4.0, 3)])
    assert r.ratios == [1.0, 1.0, 1.0] and r.ratio == 1.0
    assert (r.vllm_tok_s, r.ecoserve_tok_s) == (60.0, 60.0)
    assert (r.num_identical, r.num_requests) == (2, 4)  # the fewest identical over the rounds
    with pytest.raises(ValueError, match="at least one round"):
        Rounds("float32", [])
    with pytest.raises(ValueError, match="all of that dtype"):
        Rounds("float32", [side(1.0, 1.0, 1)])


def test_rounds_are_refused_where_they_cannot_apply(capsys) -> None:  # type: ignore[no-untyped-def]
    from ecoserve.cli import main

    assert main(["bench", "engine", "--model", "tiny-llama", "--rounds", "3"]) != 0
    assert "--rounds 3: a whole number >= 1, and only with --against vllm" in capsys.readouterr().err
    assert main(["bench", "engine", "--model", "tiny-llama", "--against", "vllm", "--rounds", "0"]) != 0
    assert "--rounds 0: a whole number >= 1" in capsys.readouterr().err


def test_each_finished_dtype_is_written_before_the_next_runs(tmp_path: Path) -> None:
    import argparse

    from ecoserve.bench.against_vllm import Rounds, write_report
    from ecoserve.bench.engine import FloorRound

    out = tmp_path / "vs.json"
    args = argparse.Namespace(out=str(out), rounds=1, model="tiny-llama")
    work = Workload(prompts=[[1, 2, 3], [4]], output_lens=[5, 7])
    done = [Rounds("float32", [SideBySide("float32", 2.0, 4.0, 12, 1, 2, {"seconds": 2.0})])]
    floors = {"float32": [FloorRound(10.0, 4.0, 1.0), FloorRound(10.0, 2.0, 1.0), FloorRound(10.0, 5.0, 1.0)]}
    write_report(args, work, done, floors, complete=False)
    doc = json.loads(out.read_text())
    assert doc["summary"]["complete"] is False
    assert doc["summary"]["float32_ratio"] == 0.5 and "bfloat16_ratio" not in doc["summary"]
    assert doc["summary"]["float32_decode_step_ms_batch1"] == 4.0  # the median round by floor share
    assert doc["per_dtype"]["float32"]["rounds"][0]["ecoserve_seconds"] == 4.0

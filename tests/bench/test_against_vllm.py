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

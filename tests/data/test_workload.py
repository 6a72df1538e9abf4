from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ecoserve.data.workload import WorkloadRequest, check_limit, fits


def test_request_is_frozen_and_counts_total_tokens() -> None:
    r = WorkloadRequest(arrival_s=1.5, prompt_len=10, output_len=5, prompt="hi")
    assert r.total_len == 15
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt_len = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arrival_s": -0.1}, "arrival_s"),
        ({"arrival_s": float("nan")}, "arrival_s"),
        ({"prompt_len": 0}, "prompt_len"),
        ({"output_len": 0}, "output_len"),
    ],
)
def test_request_rejects_bad_fields(kwargs: dict[str, float], message: str) -> None:
    fields = {"arrival_s": 0.0, "prompt_len": 1, "output_len": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        WorkloadRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [-1, 1.5, True, "3"])
def test_check_limit_names_what_is_allowed(limit: object) -> None:
    with pytest.raises(ValueError, match="None .* or an integer >= 0"):
        check_limit(limit)  # type: ignore[arg-type]


def test_fits_applies_every_limit() -> None:
    assert fits(4, 4, None, None, 4)
    assert not fits(3, 100, None, None, 4)  # prompt below the benchmark minimum of 4
    assert not fits(10, 3, None, None, 4)
    assert not fits(11, 10, 10, None, 4)
    assert not fits(10, 11, None, 20, 4)
    assert fits(10, 10, 10, 20, 4)


def test_data_package_imports_no_torch() -> None:
    # The simulator uses ecoserve.data and must stay torch-free.
    code = (
        "import sys\n"
        "import ecoserve.data.azure, ecoserve.data.sharegpt, ecoserve.data.humaneval\n"
        "import ecoserve.data.synthetic, ecoserve.data.workload\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

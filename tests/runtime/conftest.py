"""Real clusters started with `ecoserve serve` in a subprocess, as a user would; each exits
cleanly on SIGTERM with no worker process left, or the test fails."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from ecoserve.local_cluster import local_cluster

ClusterFactory = Callable[..., contextlib.AbstractContextManager[str]]


@pytest.fixture
def cluster(tmp_path: Path) -> ClusterFactory:
    def factory(model: str = "tiny-llama", prefill: int = 1, decode: int = 1, mixed: int = 0, *extra: str,
                dtype: str = "float32", device: str = "cpu") -> contextlib.AbstractContextManager[str]:
        return local_cluster(model, prefill, decode, mixed, "--threads-per-worker", "1", *extra, log_dir=tmp_path,
                             dtype=dtype, device=device)

    return factory

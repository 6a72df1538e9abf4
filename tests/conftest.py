"""Shared test set-up: offline hub, a project-local model cache, and the gpu marker's skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run and every machine (no saved database):
# a failure CI sees is one a developer reproduces, never a draw that comes and goes. To search
# afresh locally: `pytest --hypothesis-profile=explore`.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Prepared models are cached inside the checkout (ignored by git) so tests never write to the
# user's own cache, and a second local run reuses what the first one built.
os.environ.setdefault("ECOSERVE_HOME", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "ecoserve-home"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker 'gpu'); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

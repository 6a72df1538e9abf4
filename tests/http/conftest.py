"""Real clusters started with `ecoserve serve --http-port`, spoken to over HTTP with the official
`openai` package (and plain `requests` where a raw status or body matters)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ecoserve.launcher import free_port
from ecoserve.local_cluster import local_cluster

API_KEY = "test-key-0123456789"


@dataclass(frozen=True)
class Server:
    """A running cluster: its ZeroMQ address and its OpenAI API's base URL."""

    address: str
    base_url: str  # http://127.0.0.1:PORT/v1
    api_key: str | None
    metrics_url: str | None = None  # http://127.0.0.1:PORT/metrics, with --metrics-port


@contextlib.contextmanager
def http_cluster(log_dir: Path, model: str, *extra: str, api_key: str | None = None,
                 metrics_port: bool = False) -> Iterator[Server]:
    port = free_port()
    key = ("--api-key", api_key) if api_key else ()
    metrics = ("--metrics-port", str(free_port())) if metrics_port else ()
    with local_cluster(model, 1, 1, 0, "--threads-per-worker", "1", "--http-port", str(port), *key, *metrics, *extra,
                       log_dir=log_dir) as address:
        metrics_url = f"http://127.0.0.1:{metrics[1]}/metrics" if metrics else None
        yield Server(address, f"http://127.0.0.1:{port}/v1", api_key, metrics_url)


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The sim engine (tokens are deterministic, not a model's) with an API key and a metrics
    port; one cluster for every module that uses it (tests compare counters before and after)."""
    with http_cluster(tmp_path_factory.mktemp("sim"), "tiny-llama", "--engine", "sim", api_key=API_KEY,
                      metrics_port=True) as server:
        yield server

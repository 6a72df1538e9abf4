"""GET /health: 200 while every worker rank is alive, 503 (saying why) once one is lost."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from ecoserve.client import Client
from tests.http.conftest import http_cluster

pytestmark = pytest.mark.timeout(300)


def test_health_turns_503_when_a_worker_is_lost(tmp_path: Path) -> None:
    with http_cluster(tmp_path, "tiny-llama", "--engine", "sim", "--heartbeat-timeout", "2") as server:
        health = server.base_url.removesuffix("/v1") + "/health"
        # 1. Both ranks alive.
        r = requests.get(health, timeout=30)
        assert r.status_code == 200 and r.json()["workers_alive"] == 2
        # 2. The decode rank dies: the launcher notices its exit, the coordinator marks it lost.
        with Client(server.address, timeout=30) as client:
            os.kill(int(client.stats()["rank1.pid"]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (r := requests.get(health, timeout=30)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 503 and r.json()["reason"] == "1 of 2 worker ranks are alive", r.text

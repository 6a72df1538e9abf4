"""`serve --http-port` / `--metrics-port` (and `launch`'s) refuse cleanly, before any worker
starts: one line, exit 2."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from ecoserve.cli import main

pytestmark = pytest.mark.timeout(120)


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ecoserve.cli", "serve", "--engine", "sim", "--port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=100)


def test_a_port_in_use_is_refused_in_one_line() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        out = serve("--http-port", str(port))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--http-port {port}" in lines[0] and "free port" in lines[0], out.stderr


def test_an_api_key_without_http_port_is_refused() -> None:
    out = serve("--api-key", "k")
    assert out.returncode == 2 and "--http-port" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_metrics_port_in_use_or_shared_with_http_is_refused() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        out = serve("--metrics-port", str(port))
    assert out.returncode == 2 and f"--metrics-port {port}: cannot listen" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_metrics_and_http_on_one_port_and_http_on_a_member_node_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--engine", "sim", "--port", "0", "--http-port", "8123", "--metrics-port", "8123"]) == 2
    assert "--metrics-port must differ from --http-port" in capsys.readouterr().err
    launch = ["launch", "--engine", "sim", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--decode", "1"]
    assert main([*launch, "--metrics-port", "8124"]) == 2
    assert "--http-port and --metrics-port are node 0's" in capsys.readouterr().err

"""`serve --http-port` refuses cleanly, before any worker starts: one line, exit 2."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

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

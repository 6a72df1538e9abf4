"""The launcher's side of the HTTP front door: start its process once the cluster is ready,
wait for it to serve, stop it with the cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class HttpSpec:
    """`serve --http-port`: where to listen, the model folder (chat template), the API key."""

    host: str
    port: int
    model_folder: str | None = None
    api_key: str | None = None


class HttpStartFailed(RuntimeError):
    """The HTTP process exited before serving; `code` is its exit status (2: port in use)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def start_http(spec: HttpSpec, address: str, num_ranks: int) -> tuple[subprocess.Popen[bytes], str]:
    """Start the HTTP process for the coordinator at `address` (with `num_ranks` worker ranks)
    and wait until it serves; its URL."""
    env = dict(os.environ, ECOSERVE_LAUNCHER_PID=str(os.getpid()))
    env.pop("ECOSERVE_HTTP_API_KEY", None)
    if spec.api_key is not None:
        env["ECOSERVE_HTTP_API_KEY"] = spec.api_key  # not on the command line, where `ps` shows it
    with tempfile.TemporaryDirectory(prefix="ecoserve-http-") as folder:
        ready = Path(folder) / "ready"
        cmd = [sys.executable, "-m", "ecoserve.openai_api.server", "--address", address, "--host", spec.host,
               "--port", str(spec.port), "--ranks", str(num_ranks), "--ready-file", str(ready)]
        if spec.model_folder is not None:
            cmd += ["--model-folder", spec.model_folder]
        proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready.exists():
            code = proc.poll()
            if code is not None:
                raise HttpStartFailed(f"the HTTP front door exited with code {code} before serving", code)
            if time.monotonic() > deadline:
                stop_http(proc)  # blocks at most its grace period: start-up failed anyway
                raise HttpStartFailed(f"the HTTP front door did not start within {STARTUP_TIMEOUT_S:.0f} s", 1)
            await asyncio.sleep(0.05)
        return proc, ready.read_text()


def stop_http(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn finishes what it can), then SIGKILL after the grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

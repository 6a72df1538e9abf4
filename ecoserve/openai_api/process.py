"""The launcher's side of the HTTP front door: start its process once the cluster is ready,
wait for it to serve, stop it with the cluster."""

from __future__ import annotations

import asyncio
import json
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
    """`serve --http-port` and/or `--metrics-port`: where to listen (None: not that one), the
    model folder (chat template), the API key."""

    host: str
    port: int | None
    model_folder: str | None = None
    api_key: str | None = None
    metrics_port: int | None = None


@dataclass(frozen=True)
class HttpUrls:
    """Where the started process serves: the OpenAI API's root and /metrics' (None: not served)."""

    http: str | None
    metrics: str | None

    def describe(self) -> str:
        parts = [f"OpenAI API at {self.http}/v1"] if self.http else []
        return "; ".join(parts + ([f"metrics at {self.metrics}/metrics"] if self.metrics else []))


class HttpStartFailed(RuntimeError):
    """The HTTP process exited before serving; `code` is its exit status (2: port in use)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def start_http(spec: HttpSpec, address: str, num_ranks: int) -> tuple[subprocess.Popen[bytes], HttpUrls]:
    """Start the HTTP process for the coordinator at `address` (with `num_ranks` worker ranks)
    and wait until it serves; its URLs."""
    env = dict(os.environ, ECOSERVE_LAUNCHER_PID=str(os.getpid()))
    env.pop("ECOSERVE_HTTP_API_KEY", None)
    if spec.api_key is not None:
        env["ECOSERVE_HTTP_API_KEY"] = spec.api_key  # not on the command line, where `ps` shows it
    with tempfile.TemporaryDirectory(prefix="ecoserve-http-") as folder:
        ready = Path(folder) / "ready"
        cmd = [sys.executable, "-m", "ecoserve.openai_api.server", "--address", address, "--host", spec.host,
               "--ranks", str(num_ranks), "--ready-file", str(ready)]
        if spec.port is not None:
            cmd += ["--port", str(spec.port)]
        if spec.metrics_port is not None:
            cmd += ["--metrics-port", str(spec.metrics_port)]
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
        urls = json.loads(ready.read_text())
        return proc, HttpUrls(urls["http"], urls["metrics"])


def stop_http(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn finishes what it can), then SIGKILL after the grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

"""The HTTP front door's process: `python -m ecoserve.openai_api.server`, started by the
launcher once the cluster is ready (ecoserve/openai_api/process.py), never by hand.

It binds its ports first (a port in use: one line, exit 2), connects to the coordinator, writes
its ready file (JSON: the URL of the OpenAI API and of /metrics, null for a port not asked
for), and serves until SIGTERM; it dies with the launcher like a worker does. With
`--metrics-port` the same app answers /metrics alone on that port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from ecoserve import envs

PORT_IN_USE = 2


def bind(host: str, port: int, option: str = "--http-port") -> socket.socket:
    """A listening socket on host:port; OSError (with a one-line reason naming `option`) when it
    cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"{option} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                      f"choose a free port (0 picks one)") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ecoserve.openai_api.server")
    p.add_argument("--address", required=True, help="the coordinator's client address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="the OpenAI API's port (none: /metrics only)")
    p.add_argument("--metrics-port", type=int, default=None, help="a port that serves /metrics alone")
    p.add_argument("--model-folder", default=None, help="the model's folder (its tokenizer's chat template)")
    p.add_argument("--ranks", type=int, default=0, help="the cluster's worker ranks (/health: 503 while fewer are alive)")
    p.add_argument("--ready-file", default=None, help="written with the URL once serving")
    args = p.parse_args(argv)
    parent = envs.launcher_pid()
    if parent is not None:
        from ecoserve.runtime.parent import exit_with_launcher

        exit_with_launcher(parent)
    if args.port is None and args.metrics_port is None:
        print("ecoserve: error: give --port, --metrics-port or both", file=sys.stderr, flush=True)
        return 1
    socks: dict[str, socket.socket] = {}
    try:
        for name, port, option in (("http", args.port, "--http-port"), ("metrics", args.metrics_port, "--metrics-port")):
            if port is not None:
                socks[name] = bind(args.host, port, option)
    except OSError as exc:
        for sock in socks.values():
            sock.close()
        print(f"ecoserve: error: {exc}", file=sys.stderr, flush=True)
        return PORT_IN_USE
    import prometheus_client
    import uvicorn

    from ecoserve.openai_api.app import Settings, create_app

    prometheus_client.disable_created_metrics()  # no *_created series: this process's own registry only

    host = f"[{args.host}]" if ":" in args.host else args.host
    ports = {name: int(sock.getsockname()[1]) for name, sock in socks.items()}
    urls = {"http": None, "metrics": None} | {name: f"http://{host}:{port}" for name, port in ports.items()}
    settings = Settings(args.address, args.model_folder, envs.http_api_key(), envs.http_max_body_bytes(), args.ranks,
                        ports.get("metrics"))
    ready = Path(args.ready_file) if args.ready_file else None
    app = create_app(settings, on_ready=(lambda: _write_ready(ready, urls)) if ready else None)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    uvicorn.Server(config).run(sockets=list(socks.values()))
    return 0


def _write_ready(path: Path, urls: dict[str, str | None]) -> None:
    """Write then rename: the launcher never reads half a file."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(urls))
    os.replace(part, path)


if __name__ == "__main__":
    sys.exit(main())

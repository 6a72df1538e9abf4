"""The HTTP front door's process: `python -m ecoserve.openai_api.server`, started by the
launcher once the cluster is ready (ecoserve/openai_api/process.py), never by hand.

It binds its port first (a port in use: one line, exit 2), connects to the coordinator, writes
its ready file, and serves until SIGTERM; it dies with the launcher like a worker does.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ecoserve import envs

PORT_IN_USE = 2


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; OSError (with a one-line reason) when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"--http-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                      f"choose a free port (0 picks one)") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ecoserve.openai_api.server")
    p.add_argument("--address", required=True, help="the coordinator's client address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-folder", default=None, help="the model's folder (its tokenizer's chat template)")
    p.add_argument("--ranks", type=int, default=0, help="the cluster's worker ranks (/health: 503 while fewer are alive)")
    p.add_argument("--ready-file", default=None, help="written with the URL once serving")
    args = p.parse_args(argv)
    parent = envs.launcher_pid()
    if parent is not None:
        from ecoserve.runtime.parent import exit_with_launcher

        exit_with_launcher(parent)
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"ecoserve: error: {exc}", file=sys.stderr, flush=True)
        return PORT_IN_USE
    import uvicorn

    from ecoserve.openai_api.app import Settings, create_app

    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    settings = Settings(args.address, args.model_folder, envs.http_api_key(), envs.http_max_body_bytes(), args.ranks)
    ready = Path(args.ready_file) if args.ready_file else None
    app = create_app(settings, on_ready=(lambda: ready.write_text(f"http://{host}:{port}")) if ready else None)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

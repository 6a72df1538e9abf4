"""CURVE keys for the client socket: `ecoserve keys generate`, and loading them for the server
(`serve --auth curve --keys DIR`) and for clients (`Client(addr, auth_keys=DIR)`).

A key folder holds Z85 text files, one key each (40 characters):

    server.pub                  the server's public key: every client needs it
    server.key                  the server's secret key (mode 0600): the server only
    NAME.pub, NAME.key          a client's key pair (mode 0600 for the secret): that client only
    authorized_clients/*.pub    the client public keys the server accepts

A server loads server.pub, server.key and authorized_clients/; a client loads server.pub and
its own pair. Copy each file only where it is needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator

log = logging.getLogger(__name__)

SERVER = "server"
DEFAULT_CLIENT = "client"
AUTHORIZED = "authorized_clients"
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeyFileError(ValueError):
    """A key file that is missing, malformed, too widely readable or not part of a pair."""


@dataclass(frozen=True)
class ServerKeys:
    """What the server's front socket needs (keys as Z85 bytes)."""

    public: bytes
    secret: bytes = field(repr=False)
    authorized: frozenset[bytes] = frozenset()  # client public keys allowed to connect


@dataclass(frozen=True)
class ClientKeys:
    """What a client socket needs (keys as Z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes = field(repr=False)


def generate_keys(folder: str | os.PathLike[str], client: str = DEFAULT_CLIENT) -> list[Path]:
    """Write the server's pair (unless the folder has one) and a new client pair `client`, and
    authorize that client. Returns the files written. Never overwrites a key."""
    if not _NAME.match(client) or client == SERVER:
        raise KeyFileError(f"client name must be 1-64 letters, digits, '_', '.', '-' and not {SERVER!r}; got {client!r}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / AUTHORIZED).mkdir(exist_ok=True)
    written: list[Path] = []
    if not (out / f"{SERVER}.key").exists():
        written += _write_pair(out, SERVER, *zmq.curve_keypair())
    else:
        load_server_keys(out, require_clients=False)  # an existing server pair must be sound
    if (out / f"{client}.key").exists() or (out / f"{client}.pub").exists():
        raise KeyFileError(f"{out / client}.key or .pub already exists; choose another name with --client NAME")
    written += _write_pair(out, client, *zmq.curve_keypair())
    authorized = out / AUTHORIZED / f"{client}.pub"
    authorized.write_bytes((out / f"{client}.pub").read_bytes())
    return written + [authorized]


def add_keys_arguments(p: argparse.ArgumentParser) -> None:
    """`ecoserve keys generate`."""
    p.add_argument("--out", required=True, metavar="DIR", help="the key folder (created if missing)")
    p.add_argument("--client", default=DEFAULT_CLIENT, metavar="NAME", help="the client pair's name: NAME.key, NAME.pub")


def run_keys_generate(args: argparse.Namespace) -> int:
    for path in generate_keys(args.out, args.client):
        print(path)
    print(f"serve with --auth curve --keys {args.out}; give client {args.client!r} server.pub, {args.client}.pub and "
          f"{args.client}.key (Client(addr, auth_keys=DIR))")
    return 0


def load_server_keys(folder: str | os.PathLike[str], require_clients: bool = True) -> ServerKeys:
    """The server's pair and the authorized client keys in `folder`, or KeyFileError saying what is wrong."""
    out = _folder(folder)
    public, secret = _read_pair(out, SERVER)
    authorized: set[bytes] = set()
    clients = out / AUTHORIZED
    if clients.is_dir():
        authorized = {_read_key(path, secret=False) for path in sorted(clients.glob("*.pub"))}
    if require_clients and not authorized:
        raise KeyFileError(
            f"no client keys in {clients}/*.pub: no client could connect; run `ecoserve keys generate --out {out}`"
        )
    return ServerKeys(public, secret, frozenset(authorized))


def load_client_keys(folder: str | os.PathLike[str], client: str = DEFAULT_CLIENT) -> ClientKeys:
    """The server's public key and client `client`'s pair in `folder`, or KeyFileError."""
    out = _folder(folder)
    server_public = _read_key(out / f"{SERVER}.pub", secret=False)
    public, secret = _read_pair(out, client)
    return ClientKeys(server_public, public, secret)


def _folder(folder: str | os.PathLike[str]) -> Path:
    out = Path(folder)
    if not out.is_dir():
        raise KeyFileError(f"key folder {out} does not exist; make one with `ecoserve keys generate --out {out}`")
    return out


def _write_pair(out: Path, name: str, public: bytes, secret: bytes) -> list[Path]:
    pub, key = out / f"{name}.pub", out / f"{name}.key"
    pub.write_bytes(public + b"\n")
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return [pub, key]


def _read_pair(out: Path, name: str) -> tuple[bytes, bytes]:
    public = _read_key(out / f"{name}.pub", secret=False)
    secret = _read_key(out / f"{name}.key", secret=True)
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{out / name}.pub is not the public key of {out / name}.key; regenerate the pair")
    return public, secret


def _read_key(path: Path, secret: bool) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found; make keys with `ecoserve keys generate --out {path.parent}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    if not _Z85_KEY.match(text):
        raise KeyFileError(f"{path} does not hold a CURVE key (40 Z85 characters, as `ecoserve keys generate` writes)")
    if secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"secret key file {path} is accessible to other users (mode {stat.filemode(mode)}); chmod 600 it")
    return text.encode("ascii")


class _AllowList:
    """pyzmq's CURVE credentials provider: the authorized client keys, nothing else."""

    def __init__(self, authorized: frozenset[bytes]) -> None:
        self.authorized = authorized
        self.refused = 0
        self._next_log = 0.0

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.authorized:
            return True
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_log:  # at most one line a second, however fast a stranger retries
            self._next_log = now + 1.0
            log.warning("refused a client with an unknown CURVE key %s (%d refused so far)", client_key.decode(), self.refused)
        return False


def start_authenticator(ctx: zmq.Context[Any], authorized: frozenset[bytes]) -> AsyncioAuthenticator:
    """ZAP handler for every CURVE socket of `ctx`, in the running event loop. Start it before
    binding: a CURVE server with no ZAP handler would admit any client key."""
    authenticator = AsyncioAuthenticator(ctx)
    authenticator.configure_curve_callback("*", _AllowList(authorized))
    authenticator.start()
    return authenticator

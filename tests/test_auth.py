"""CURVE key files (`ecoserve keys generate`) and the one-line errors for bad ones: `serve`
exits 2 naming the file and the fix, before anything starts."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import zmq

from ecoserve.auth import KeyFileError, generate_keys, load_client_keys, load_server_keys
from ecoserve.cli import build_parser, main
from ecoserve.config import CoordinatorConfig
from ecoserve.client import Client

SERVE = ["serve", "--engine", "sim", "--port", "0"]


def test_keys_generate_writes_pairs_with_private_secret_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "generate", "--out", str(keys)]) == 0
    assert main(["keys", "generate", "--out", str(keys), "--client", "bench-1"]) == 0
    out = capsys.readouterr().out
    assert "--auth curve --keys" in out and "bench-1.key" in out
    for name in ("server", "client", "bench-1"):
        assert stat.S_IMODE((keys / f"{name}.key").stat().st_mode) == 0o600
        assert len((keys / f"{name}.pub").read_text().strip()) == 40
    assert sorted(f.name for f in (keys / "authorized_clients").iterdir()) == ["bench-1.pub", "client.pub"]
    server, client = load_server_keys(keys), load_client_keys(keys, "bench-1")
    assert client.server_public == server.public and client.public in server.authorized
    assert zmq.curve_public(server.secret) == server.public
    assert server.secret.decode() not in repr(server) and client.secret.decode() not in repr(client)  # no keys in logs


def test_keys_are_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_keys(tmp_path)
    before = (tmp_path / "server.key").read_bytes()
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 2
    assert "already exists; choose another name with --client NAME" in capsys.readouterr().err
    assert main(["keys", "generate", "--out", str(tmp_path), "--client", "../evil"]) == 2
    assert (tmp_path / "server.key").read_bytes() == before


def broken(folder: Path, how: str) -> None:
    generate_keys(folder)
    if how == "missing secret":
        (folder / "server.key").unlink()
    elif how == "readable secret":
        os.chmod(folder / "server.key", 0o644)
    elif how == "malformed public":
        (folder / "server.pub").write_text("not a key\n")
    elif how == "mismatched pair":
        (folder / "server.pub").write_bytes((folder / "client.pub").read_bytes())
    elif how == "no authorized clients":
        (folder / "authorized_clients" / "client.pub").unlink()
    elif how == "malformed authorized key":
        (folder / "authorized_clients" / "evil.pub").write_bytes(b"\x80\x81 binary")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing secret", "server.key not found; make keys with `ecoserve keys generate --out"),
        ("readable secret", r"server.key is accessible to other users \(mode -rw-r--r--\); chmod 600 it"),
        ("malformed public", "server.pub does not hold a CURVE key"),
        ("mismatched pair", "server.pub is not the public key of .*server.key"),
        ("no authorized clients", "no client keys in .*authorized_clients"),
        ("malformed authorized key", "cannot read key file .*evil.pub"),
    ],
)
def test_bad_key_files_are_one_line_errors_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, message: str
) -> None:
    broken(tmp_path, how)
    assert main([*SERVE, "--auth", "curve", "--keys", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ecoserve: error: "), err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auth", "curve"], "auth 'curve' needs keys_dir"),
        (["--keys", "/tmp"], "keys_dir needs auth 'curve'"),
        (["--auth", "curve", "--keys", "/nonexistent/keys"], "key folder /nonexistent/keys does not exist"),
        (["--max-inflight-per-client", "0"], "max_inflight_per_client must be an integer >= 1, got 0"),
        (["--max-prompt-tokens-per-client", "-5"], "max_prompt_tokens_per_client must be an integer >= 1, got -5"),
    ],
)
def test_bad_security_options_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main([*SERVE, *args]) == 2
    assert message in capsys.readouterr().err


def test_a_client_with_bad_keys_fails_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="key folder .* does not exist"):
        Client("tcp://127.0.0.1:1", auth_keys=tmp_path / "none")
    generate_keys(tmp_path)
    os.chmod(tmp_path / "client.key", 0o640)
    with pytest.raises(KeyFileError, match="client.key is accessible to other users"):
        Client("tcp://127.0.0.1:1", auth_keys=tmp_path)


def test_the_client_socket_is_local_and_unauthenticated_by_default() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.auth, args.keys) == ("127.0.0.1", "none", None)
    config = CoordinatorConfig()
    assert config.host == "127.0.0.1" and config.control_host == "127.0.0.1" and config.auth == "none"

"""`ecoserve serve` refuses what cannot work in one line, `ecoserve: error: ...` naming what was
wrong and what is allowed, exit status 2, with no worker process left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ecoserve.local_cluster import is_running


def serve(*args: str, model: str = "tiny-llama", lines: int = 1) -> subprocess.CompletedProcess[str]:
    """Run `ecoserve serve` to its end and check the refusal's form: exit 2, `lines` lines on
    stderr, each one error, and no process it started still running (they carry a tag in their
    environment)."""
    tag = uuid.uuid4().hex
    out = subprocess.run(
        [sys.executable, "-m", "ecoserve.cli", "serve", "--model", model, "--device", "cpu", "--port", "0",
         "--threads-per-worker", "1", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ECOSERVE_TEST_TAG": tag},
    )
    assert out.returncode == 2, out.stderr
    errors = out.stderr.strip().splitlines()
    assert 1 <= len(errors) <= lines and all(e.startswith("ecoserve: error: ") for e in errors), out.stderr
    assert "EcoServe ready" not in out.stdout
    assert not tagged_processes(tag), "a worker outlived the refusal"
    return out


def tagged_processes(tag: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"ECOSERVE_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if is_running(pid)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--host", "256.1.1.1"), "host '256.1.1.1' is not a valid IP address; give an IPv4 or IPv6 address of this "
         "machine (127.0.0.1: this machine only, 0.0.0.0: every interface) or a host name"),
        (("--policy", "ecoserve", "--policy-option", "margin=abc"),
         "ecoserve option margin must be a number (default 0.05), got 'abc'"),
        (("--policy", "ecoserve", "--policy-option", "pipelining=yes"),
         "ecoserve option pipelining must be true or false (default true), got 'yes'"),
        (("--drain-timeout", "-5"), "drain_timeout_s must be a number of seconds >= 0 (0: fail what is in flight at once), got -5.0"),
        (("--threads-per-worker", "0"), "--threads-per-worker must be >= 1 (or omitted: this machine's cores / workers), got 0"),
        (("--num-blocks", "1"), "num_blocks must be >= 2 (or unset: sized from kv_cache_gib), got 1: a pool of one block "
         "holds one request of at most block_size (16) tokens, prompt and output together, and nothing else"),
    ],
    ids=["host", "margin", "bool-option", "drain-timeout", "threads", "num-blocks"],
)
def test_a_bad_value_is_refused_before_anything_starts(args: tuple[str, ...], message: str) -> None:
    assert message in serve(*args).stderr


def test_a_port_in_use_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = serve("--port", str(port))
    assert (f"cannot bind the client socket (--host, --port) to tcp://127.0.0.1:{port}: the address is in use "
            "(another server listens there); choose a free port, or 0 to pick one") in out.stderr


def _model_folder(tmp_path: Path, weights: bytes) -> Path:
    from ecoserve.model.registry import resolve_model

    folder = tmp_path / "model"
    folder.mkdir()
    for source in resolve_model("tiny-llama").iterdir():  # config.json and the tokenizer's files
        if source.is_file() and source.suffix == ".json":
            (folder / source.name).write_bytes(source.read_bytes())
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_garbage_weights_are_refused_before_any_worker_starts(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path, bytes(range(256)) * 16)  # its length field reads as ~5e17 bytes
    out = serve(model=str(folder))
    assert f"{folder}/model.safetensors is not a safetensors file (its header length field says " in out.stderr
    assert "accepted: a built-in model" in out.stderr


def test_weights_that_fail_to_load_in_the_worker_are_one_line(tmp_path: Path) -> None:
    """A well-formed file holding the wrong tensors passes the header check; the worker's load
    fails, and that surfaces as its one line."""
    header = json.dumps({"junk": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    folder = _model_folder(tmp_path, len(header).to_bytes(8, "little") + header + bytes(4))
    out = serve("--prefill", "0", "--decode", "0", "--mixed", "1", model=str(folder))
    assert "ecoserve: error: worker rank 0 (mixed) could not start: " in out.stderr


def test_workers_that_fail_to_load_say_so_in_one_line(tmp_path: Path) -> None:
    """Two workers loading the same bad weights both fail; the launcher prints the first one's
    line only (the others write theirs to files it does not print), never a traceback."""
    header = json.dumps({"junk": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    folder = _model_folder(tmp_path, len(header).to_bytes(8, "little") + header + bytes(4))
    out = serve(model=str(folder), lines=1)
    assert "could not start: KeyError: \"weight 'model.embed_tokens.weight' is missing from the checkpoint\"" in out.stderr

"""Every `ecoserve` command and option as it was before the restructuring (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

from ecoserve.cli import build_parser
from tests.cli.surface import surface

SNAPSHOT = Path(__file__).with_name("cli_surface.json")


def test_every_command_and_option_is_unchanged() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    actual = json.loads(json.dumps(surface(build_parser())))
    assert sorted(actual) == sorted(expected), "commands added or removed"
    for path, spec in expected.items():
        assert actual[path] == spec, f"`{path}` changed"


def test_the_snapshot_lists_every_command() -> None:
    # A guard on the snapshot itself: it holds the commands the README documents.
    expected = json.loads(SNAPSHOT.read_text())
    for path in ("ecoserve serve", "ecoserve launch", "ecoserve sim", "ecoserve demo", "ecoserve profile",
                 "ecoserve bench results", "ecoserve bench serve", "ecoserve predictor train"):
        assert path in expected and expected[path]["options"], path

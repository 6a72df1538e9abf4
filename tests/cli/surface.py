"""The `ecoserve` command's surface: every command path with its options, as plain data.

`tests/cli/cli_surface.json` was written from this function before the package was restructured
(issue 15); `test_cli_surface.py` holds the parser to it, so moving a module can never rename,
drop or re-default a command or an option unnoticed. To accept a deliberate change, rewrite the
snapshot: `python -m tests.cli.surface > tests/cli/cli_surface.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _portable(text: Any) -> Any:
    """`text` with this checkout's package folder written as `<ecoserve>` (defaults name bundled files)."""
    import ecoserve

    root = str(Path(ecoserve.__file__).parent)
    return text.replace(root, "<ecoserve>") if isinstance(text, str) else text


def _action(action: argparse.Action) -> dict[str, Any]:
    return {
        "options": list(action.option_strings),
        "dest": action.dest,
        "default": _portable(repr(action.default)),
        "choices": None if action.choices is None else [repr(c) for c in action.choices],
        "nargs": repr(action.nargs),
        "required": bool(action.required),
        "type": getattr(action.type, "__name__", repr(action.type)) if action.type is not None else None,
        "kind": type(action).__name__,
        "metavar": repr(action.metavar),
        "help": _portable(action.help),
    }


def surface(parser: argparse.ArgumentParser, path: str = "ecoserve") -> dict[str, Any]:
    """{command path: {"description", "options": [...]}} for `parser` and every subcommand below it."""
    out: dict[str, Any] = {}
    options = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                sub = surface(child, f"{path} {name}")
                sub[f"{path} {name}"]["help"] = helps.get(name)
                out.update(sub)
            options.append({"subcommands": sorted(action.choices), "dest": action.dest, "required": action.required})
        elif not isinstance(action, argparse._HelpAction):
            options.append(_action(action))
    out[path] = {"description": parser.description, "options": options}
    return dict(sorted(out.items()))


def main() -> None:
    from ecoserve.cli import build_parser

    print(json.dumps(surface(build_parser()), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

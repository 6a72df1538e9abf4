"""The layout reads as the diagram (STYLE §1, §9): each package says what it owns, no module grows
past the size at which it stops being one room, and bench/ holds only measurements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ecoserve"
MAX_MODULE_LINES = 600
PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py"))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_every_package_opens_with_a_short_docstring(package: Path) -> None:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc, f"{package.name}/__init__.py has no docstring"
    summary = doc.split("\n\n")[0]
    assert len(summary.splitlines()) <= 2, f"{package.name}: the opening paragraph is longer than two lines"


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    big = {str(p.relative_to(PACKAGE.parent)): n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_bench_holds_no_product_command_training_or_simulator_front_end() -> None:
    # The commands that are not measurements live beside what they run (issue 15).
    names = {str(p.relative_to(PACKAGE / "bench")) for p in (PACKAGE / "bench").rglob("*.py")}
    for moved in ("demo.py", "cluster_demo.py", "compare.py", "results.py", "lengths.py", "profile_fit.py"):
        assert moved not in names, moved
    assert not [n for n in names if n.startswith("predictor")], names
    for path in (PACKAGE / "bench").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.startswith(("ecoserve.demo", "ecoserve.predictor.training"))}, path

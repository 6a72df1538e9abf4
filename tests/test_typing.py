"""The package type-checks (STYLE §10): mypy over `ecoserve/` reports no errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_mypy_is_clean(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "ecoserve", "--ignore-missing-imports", "--cache-dir", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

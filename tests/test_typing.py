"""The package type-checks: mypy with the configuration in pyproject.toml ([tool.mypy]) reports
no error, so the ``py.typed`` marker the wheel ships tells the truth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    pytest.importorskip("mypy")
    run = subprocess.run([sys.executable, "-m", "mypy", "torchlens_edu"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"},
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success: no issues found" in run.stdout


def test_every_type_ignore_names_its_code() -> None:
    # mypy's ignore-without-code check covers this too; this one also runs in the fast loop
    bare = [f"{path.relative_to(ROOT)}:{number}"
            for path in sorted((ROOT / "torchlens_edu").rglob("*.py"))
            for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
            if "# type: ignore" in line and "# type: ignore[" not in line]
    assert bare == []

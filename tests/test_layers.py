"""The layers of docs/DESIGN.md hold: import-linter's contracts in pyproject.toml, checked by
``lint-imports`` (every import counts, also one inside a function)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package under ``root``, with ``root``'s pyproject.toml."""
    command = shutil.which("lint-imports")
    if command is None:
        pytest.skip("import-linter is not installed (it is in the dev extra)")
    return subprocess.run([command, "--no-cache"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root)})


def test_every_layer_contract_is_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 6 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    """The check can fail: a copy of the package whose model imports the toolkit is caught."""
    shutil.copytree(ROOT / "torchlens_edu", tmp_path / "torchlens_edu",
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    gpt2 = tmp_path / "torchlens_edu" / "models" / "gpt2.py"
    gpt2.write_text(gpt2.read_text() + "\nfrom torchlens_edu import debug  # wired in again\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "models/ imports torch (and itself), nothing of the toolkit BROKEN" in result.stdout
    assert "torchlens_edu.models.gpt2 -> torchlens_edu.debug" in result.stdout


def test_an_import_cycle_breaks_the_contracts(tmp_path: Path) -> None:
    """A function-level import counts: ops importing the tracer back is a cycle again."""
    shutil.copytree(ROOT / "torchlens_edu", tmp_path / "torchlens_edu",
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ops = tmp_path / "torchlens_edu" / "shapes" / "ops.py"
    ops.write_text(ops.read_text() + "\n\ndef _tracer():\n"
                   "    from torchlens_edu.shapes import tracer\n\n    return tracer\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "no import cycles between sibling modules, at any depth BROKEN" in result.stdout
    assert "torchlens_edu.shapes" in result.stdout and ".tracer -> .ops" in result.stdout


def test_no_module_is_named_like_a_public_function() -> None:
    """``tle.hooks`` is a function; a module ``torchlens_edu.hooks`` would shadow it after
    ``import torchlens_edu.hooks`` (the lesson of the first layout). Same for models/."""
    import torchlens_edu as tle
    import torchlens_edu.models as models

    names = {p.stem for p in (ROOT / "torchlens_edu").rglob("*.py")} | {
        p.name for p in (ROOT / "torchlens_edu").rglob("*") if p.is_dir()}
    public = {n for n in tle.__all__ if callable(getattr(tle, n))} | set(models.__all__)
    assert not names & public, sorted(names & public)


def test_models_import_nothing_of_the_toolkit_including_packages_added_later() -> None:
    """The forbidden contract names today's packages; this asks grimp for everything models/
    reaches, so a package added later (compare/, ...) is covered too."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("torchlens_edu", cache_dir=None)
    reached = graph.find_upstream_modules("torchlens_edu.models", as_package=True)
    assert not {m for m in reached if m.startswith("torchlens_edu")}, sorted(reached)

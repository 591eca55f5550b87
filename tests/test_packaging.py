"""What the package needs to run is what pyproject.toml declares (without any extra).

A third-party module imported while the main job runs must come from a declared dependency or
from one of their own declared requirements: torchinfo imports numpy without declaring it, and
torch >= 2.13 no longer installs it, so a bare `pip install torchlens-edu` crashed the demo.
CI proves the same in a fresh venv (`.ci/run`); this test finds the gap in any environment.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_closure() -> set[str]:
    """The distributions that `pip install .` installs: the declared dependencies and, through
    their metadata, everything they require (markers evaluated here, extras not taken)."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = list(project["dependencies"])
    seen: set[str] = set()
    while todo:
        req = requirements.Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _normalize(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(metadata.requires(name) or [])
        except metadata.PackageNotFoundError:
            continue  # not installed here, so nothing here can import it either
    return seen


def _bare_site_packages(root: Path, distributions: set[str]) -> Path:
    """A site-packages folder holding only ``distributions`` (links to the installed files)."""
    site = root / "site-packages"
    site.mkdir()
    for dist in metadata.distributions():
        if _normalize(dist.metadata["Name"]) not in distributions:
            continue
        base = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files or [] if not f.parts[0].startswith("..")}:
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    return site


@pytest.mark.slow
def test_the_demo_runs_with_only_the_declared_dependencies(tmp_path: Path) -> None:
    """A bare `pip install .`, simulated: the demo sees the declared closure and nothing else."""
    site = _bare_site_packages(tmp_path, _declared_closure() - {"torchlens-edu"})
    code = ("import site, sys\n"
            f"site.addsitedir({str(site)!r}); sys.path.insert(0, {str(REPO)!r})\n"
            "from torchlens_edu.cli import main\n"
            "sys.exit(main(['demo', '--device', 'cpu', '--max-new-tokens', '2']))\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "COLUMNS": "100",
           "HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6. " in done.stdout
    assert "Failed to initialize NumPy" not in done.stderr


def test_numpy_is_declared_for_torchinfo() -> None:
    assert "numpy" in _declared_closure()

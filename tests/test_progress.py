"""Progress is drawn only while something slow happens, and loading stays quiet otherwise:
no bar flashing on stderr for the embedded model, no tqdm (and its notebook warning) offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
                "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO),
                                                            os.environ.get("PYTHONPATH")))),
                **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=180, cwd=tmp_path)


def test_a_quick_load_writes_nothing_to_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    # FORCE_COLOR: rich treats stderr as a terminal, where a transient bar used to leave an
    # escape sequence and a blank line behind. The clock stands still: the load is "quick"
    # however busy the machine running this test is.
    from torchlens_edu.models import GPT2, progress

    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: 0.0))
    GPT2.from_pretrained("embedded")
    assert capfd.readouterr().err == ""


def test_a_slow_step_shows_its_bar(tmp_path: Path) -> None:
    done = _run("from torchlens_edu.models.progress import progress\n"
                "with progress('loading big.safetensors', show_after_s=0) as advance:\n"
                "    advance(total=1); advance()\n", tmp_path, FORCE_COLOR="1")
    assert done.returncode == 0, done.stderr
    assert "loading big.safetensors" in done.stderr


def test_the_offline_path_imports_no_download_code(tmp_path: Path) -> None:
    done = _run("import sys\n"
                "from torchlens_edu.models.offline import load_best_available\n"
                "model, tok, notice = load_best_available(device='cpu')\n"
                "print(notice)\n"
                "print(sorted(m for m in sys.modules if m in ('tqdm.auto', 'tqdm.autonotebook',"
                " 'huggingface_hub.file_download')))\n", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "using the small embedded model" in done.stdout
    # tqdm.auto warns "IProgress not found" in Jupyter without ipywidgets (torch imports the
    # plain tqdm, which does not)
    assert done.stdout.splitlines()[-1] == "[]"

"""Every lesson in demos/ runs (smoke test), the notebook executes, and `torchlens-edu demo`
works offline on the embedded model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMOS = REPO / "demos"
LESSONS = sorted(DEMOS.glob("0*.py"))

# What each lesson must print: proof that it reached its point, not just that it exited 0.
EXPECTED = {
    "01": ["describe", "NaN:1"],
    "02": ["every row sums to 1: True", "hooks left on the model: 0"],
    "03": ["hs=64", "did you mean k.transpose(-2, -1)?"],
    "04": ["made in forward: log", "made in backward: SqrtBackward0"],
    "05": ["no stop requested", "max |explicit - fast|"],
    "06": ["cache.length", "use_cache=True", "tokens/s (median of 5)", "faster here (medians)"],
    "07": ["LlamaForCausalLM", "attention"],
    "09": ["your line  09_find_my_bug.py:", "the models agree within the tolerance",
           "drift (legal, within the tolerance)"],
}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHLENS_EDU_")}
    # this checkout first, then whatever the caller's PYTHONPATH holds (packages installed there)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-hub-cache"),
               COLUMNS="100", PYTHONPATH=path)
    env.update(extra)  # may set COLUMNS again
    return env  # an empty hub cache: every lesson takes the embedded model, as in CI


def _run(args: list[str], tmp_path: Path, timeout: float = 180, **env: str
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(tmp_path, **env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def test_every_numbered_lesson_is_tested() -> None:
    assert [p.name[:2] for p in LESSONS] == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs(lesson: Path, tmp_path: Path) -> None:
    assert (lesson.read_text().split('"""')[1]).count("What to look at") == 1
    result = _run([str(lesson)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in EXPECTED[lesson.name[:2]]:
        assert text in result.stdout, f"{text!r} missing from {lesson.name}'s output"


# Lessons 01, 02 and 06 print torch's own reprs and describe() lines with soft wrap (the
# terminal wraps them, a copy-paste keeps them whole); the others print through rich only.
RICH_ONLY = [p for p in LESSONS if p.name[:2] in ("03", "04", "05", "07", "09")]


@pytest.mark.slow
@pytest.mark.parametrize("lesson", RICH_ONLY, ids=lambda p: p.stem)
def test_lessons_fit_80_columns_without_colour(lesson: Path, tmp_path: Path) -> None:
    result = _run([str(lesson)], tmp_path, COLUMNS="80", NO_COLOR="1")
    assert result.returncode == 0, result.stderr[-3000:]
    wide = [line for line in result.stdout.splitlines() if len(line.rstrip()) > 80]
    assert wide == [], f"{lesson.name}: lines over 80 columns"
    assert "\x1b[" not in result.stdout  # NO_COLOR: no escape codes


@pytest.mark.slow
def test_lesson_05_with_a_stop_requested_never_hangs(tmp_path: Path) -> None:
    # no debugger attached and no terminal: the stop is skipped with a message
    result = _run([str(DEMOS / "05_attention_in_vscode.py")], tmp_path,
                  TORCHLENS_EDU_STOP="attention:layer=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" in result.stderr


def _kernel_spec(tmp_path: Path) -> str:
    """A kernel spec for *this* interpreter, so the notebook runs against this environment."""
    spec = tmp_path / "jupyter" / "kernels" / "tle-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "torchlens_edu tests", "language": "python"}))
    return "tle-test"


@pytest.mark.slow
def test_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for key, value in _env(tmp_path, JUPYTER_PATH=str(tmp_path / "jupyter")).items():
        monkeypatch.setenv(key, value)
    kernel = _kernel_spec(tmp_path)
    nb = nbformat.read(DEMOS / "08_notebook.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name=kernel,
                            resources={"metadata": {"path": str(DEMOS)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # no warnings (rich's 'install "ipywidgets"', tqdm's IProgress) and nothing on stderr
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], outputs
    texts = [o.get("text", "") + "".join(map(str, o.get("data", {}).values())) for o in outputs]
    assert not [t for t in texts if "Warning" in t or "ipywidgets" in t], texts
    assert all(o.get("data", {}).get("text/plain", "x").strip() for o in outputs)  # no blanks
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "ShapeTrace" in html and "attention" in html  # rich output rendered as HTML
    assert "transformer.h.1.ln_2" in html and "layer_norm" in html  # compare found the slip


@pytest.mark.slow
def test_demo_command_offline(tmp_path: Path) -> None:
    result = _run(["-m", "torchlens_edu.cli", "demo", "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "using the small embedded model" in result.stderr  # the one-line notice
    for section in ("1. the model", "2. shapes", "3. attention", "4. the residual stream",
                    "5. generation", "6. an Inf caught at its source"):
        assert section in out
    assert "(x4, identical shapes)" in out  # the folded blocks of the shape trace
    assert "previous-token head" in out and "an induction head" in out
    assert [line[:9] for line in out.splitlines() if line.startswith("after h.")] == [
        "after h.0", "after h.1", "after h.2", "after h.3"]  # every layer, none skipped
    assert "+Inf made in forward" in out and "transformer.h.1.mlp.c_fc" in out
    assert "plant +inf in one weight of h.1.mlp.c_fc" in out
    # the sample backs the README's "made of real words": every finished word is one
    sample = out.split("5. generation")[1].splitlines()[1].removeprefix("Mr. Darcy looked at")
    vocabulary = set((REPO / "torchlens_edu/data/embedded/words.txt").read_text().split())
    words = re.findall(r"[a-z]+", sample.lower())[:-1]  # the last one may be cut short
    assert len(words) > 8 and set(words) <= vocabulary, sample
    # 29 prompt characters + 35 fill the context of 64; the other 25 come from its last 32
    assert "the model reads at most 64 tokens: each time they were full it went on from the " \
           "last 32 (1x)" in out


@pytest.mark.slow
def test_demo_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from torchlens_edu.cli import main

    assert main(["demo", "--model", "embedded", "--prompt", "日本"]) == 1
    assert "not in the embedded tokenizer's vocabulary" in capsys.readouterr().err
    assert main(["demo", "--model", "no/such/dir/model.safetensors"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["demo", "--model", "embedded", "--prompt", "a"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_demo_cuda_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from torchlens_edu.cli import main

    assert main(["demo", "--device", "cuda", "--model", "embedded"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_on_cuda(tmp_path: Path) -> None:
    result = _run(["-m", "torchlens_edu.cli", "demo", "--device", "cuda"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda" in result.stdout and "+Inf made in forward" in result.stdout


def test_demo_generation_goes_on_past_a_full_context() -> None:
    from rich.console import Console

    from torchlens_edu.commands.demo import _generate
    from torchlens_edu.models import GPT2, GPT2Config, get_tokenizer

    model = GPT2(GPT2Config(vocab_size=81, n_positions=16, n_embd=32, n_layer=1,
                            n_head=2)).eval()
    tok = get_tokenizer("embedded")
    console = Console(width=200, no_color=True, highlight=False)
    with console.capture() as capture:
        _generate(console, model, tok, torch.tensor([tok.encode("Emma")]), 30)
    sample, note = capture.get().rstrip("\n").rsplit("\n", 1)  # the sample may hold "\n"
    assert sample.startswith("Emma") and len(sample) == 4 + 30  # one character a token
    # 12 fill the context of 16, then from its last 8: 8 more, 8 more, the last 2
    assert note == "the model reads at most 16 tokens: each time they were full it went on " \
                   "from the last 8 (3x)"

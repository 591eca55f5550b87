"""``torchlens-edu``: every subcommand answers bad input with one clean line on stderr and a
non-zero exit code (2: the command line; 1: the command could not do its job), Ctrl-C is
``interrupted`` and 130, and every help text is plain text."""

from __future__ import annotations

import argparse
import bdb
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from torchlens_edu.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("debug", "demo", "generate", "trace", "vscode")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str) -> str:
    """The single non-blank line of stderr, checked to be an error and not a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def offline_empty_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))


# --- help texts (issue 17 item 9) -------------------------------------------------------------

def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


def test_every_help_text_is_plain_text():
    parsers = _all_parsers(build_parser())
    assert {p.prog for p in parsers} >= {f"torchlens-edu {c}" for c in COMMANDS} | {
        "torchlens-edu vscode init"}
    for parser in parsers:
        text = parser.format_help()
        for markup in ("``", ":func:", ":class:", ":meth:", ">>>", "[red]", "[/"):
            assert markup not in text, f"{parser.prog} --help shows {markup!r}:\n{text}"


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["debug", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal width
    assert "stop point (--stop attention:layer=0 or $TORCHLENS_EDU_STOP)" in out


# --- the command line itself: exit code 2, one line -----------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["nosuch"], "argument COMMAND: invalid choice: 'nosuch'"),
    (["vscode"], "the following arguments are required: ACTION"),
    (["trace", "--depth", "-1", "Hi"], "argument --depth: must be >= 0, got -1"),
    (["trace", "--depth", "x", "Hi"], "argument --depth: expected a whole number, got 'x'"),
    (["trace", ""], "argument prompt: the prompt is empty"),
    (["debug", "--prompt", "", "--device", "cpu"], "argument --prompt: the prompt is empty"),
    (["demo", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 0, got -1"),
    (["demo", "--prompt", ""], "argument --prompt: the prompt is empty"),
    (["generate", "hi", "--temperature", "nan"],
     "argument --temperature: must be a finite number >= 0 (0 is greedy, 1 samples the "
     "model's own probabilities), got nan"),
    (["generate", "hi", "--temperature", "inf"], "must be a finite number >= 0"),
    (["generate", "hi", "--seed", str(2**70)],
     f"argument --seed: must be between 0 and 2**64 - 1 = {2**64 - 1}, got {2**70}"),
    (["generate", "hi", "--seed", "-1"], "argument --seed: must be between 0 and 2**64 - 1"),
    (["generate", "hi", "--max-new-tokens", "-5"], "argument --max-new-tokens: must be >= 0"),
    (["generate", "hi", "--top-k", "2.5"], "argument --top-k: expected a whole number, got '2.5'"),
    (["debug", "--print", "nope", "--device", "cpu"], "unknown print preset 'nope'"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(capsys, argv, words):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    line = _one_error(err)
    assert words in line
    if argv[0] != "debug":
        assert line.endswith(f"(see: torchlens-edu{' ' + argv[0] if argv[0] in COMMANDS else ''} "
                             "--help)") or argv == ["vscode"]


def test_the_largest_seed_is_accepted():
    from torchlens_edu.commands import _inputs

    assert _inputs.seed(str(2**64 - 1)) == 2**64 - 1


# --- trace (issue 16 item 11) -----------------------------------------------------------------

def test_trace_prompt_outside_the_embedded_vocabulary(capsys):
    code, _, err = _run(capsys, "trace", "hi 😀")
    assert code == 1
    assert "characters '😀' are not in the embedded tokenizer's vocabulary" in _one_error(err)


def test_trace_prompt_longer_than_the_context(capsys):
    code, _, err = _run(capsys, "trace", "a" * 300)
    assert code == 2
    assert ("the prompt makes 300 tokens, but the model reads at most 64 (its context); "
            "shorten the prompt") in _one_error(err)


def test_trace_missing_model(capsys, tmp_path):
    code, _, err = _run(capsys, "trace", "--model", str(tmp_path / "nope"), "Hi")
    assert code == 1 and f"no such file or directory: {tmp_path / 'nope'}" in _one_error(err)


def test_trace_gpt2_offline(capsys, offline_empty_hub):
    code, _, err = _run(capsys, "trace", "--model", "gpt2", "Hi")
    assert code == 1
    line = _one_error(err)
    assert "GPT-2 weights 'gpt2' are not in the Hugging Face cache" in line
    assert "huggingface-cli download gpt2" in line


def test_trace_include_that_matches_nothing(capsys):
    code, _, err = _run(capsys, "trace", "--include", "nothing", "Hi")
    assert code == 1
    assert "pattern 'nothing' matches no module of the model" in _one_error(err)


def test_trace_truncated_checkpoint(capsys, tmp_path):
    from safetensors.torch import save_file

    from torchlens_edu.models import GPT2, GPT2Config

    folder = tmp_path / "model"
    folder.mkdir()
    model = GPT2(GPT2Config.preset("tiny"))
    save_file({f"transformer.{k}" if not k.startswith("lm_head") else k: v.contiguous()
               for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    c = model.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "n_positions": c.n_positions, "vocab_size": c.vocab_size}))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "trace", "--model", str(folder), "Hi")
    assert code == 1
    line = _one_error(err)
    assert f"{folder / 'model.safetensors'} is damaged or incomplete" in line


# --- debug (issue 16 item 11) -----------------------------------------------------------------

def test_debug_prompt_longer_than_the_context(capsys):
    code, _, err = _run(capsys, "debug", "--device", "cpu", "--prompt", "a" * 200)
    assert code == 2 and "the prompt makes 200 tokens" in _one_error(err)


def test_debug_script_sys_exit_message_is_kept(capsys, tmp_path):
    script = tmp_path / "lesson.py"
    script.write_text('import sys\nsys.exit("the data folder is missing")\n')
    code, _, err = _run(capsys, "debug", str(script))
    assert code == 1
    assert err.strip() == "the data folder is missing"  # as `python lesson.py` prints it


def test_debug_script_error_shows_the_scripts_traceback(capsys, tmp_path):
    script = tmp_path / "lesson.py"
    script.write_text("def f():\n    raise ValueError('my bug')\n\nf()\n")
    code, _, err = _run(capsys, "debug", str(script))
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert f'File "{script}", line 4' in err and "raise ValueError('my bug')" in err
    assert err.rstrip().endswith("ValueError: my bug")
    assert "runpy" not in err and "torchlens_edu" not in err  # only the learner's frames


def test_debug_script_error_stays_uncaught_under_a_debugger(monkeypatch, tmp_path):
    """VS Code stops at uncaught exceptions: under a debugger the script's own error is not
    turned into a message, even a ValueError that the CLI would shorten for its own input."""
    from torchlens_edu._core import debugger

    monkeypatch.setattr(debugger, "debugger_attached", lambda: True)
    script = tmp_path / "lesson.py"
    script.write_text("raise ValueError('my bug')\n")
    with pytest.raises(ValueError, match="my bug") as raised:
        main(["debug", str(script)])
    assert raised.traceback[-1].path == script  # raised where the learner wrote it


def test_debug_script_syntax_error_is_shown_as_python_shows_it(capsys, tmp_path):
    script = tmp_path / "lesson.py"
    script.write_text("x = (\n")
    code, _, err = _run(capsys, "debug", str(script))
    assert code == 1
    assert err.startswith(f'  File "{script}", line 1\n    x = (\n')
    assert err.rstrip().endswith("SyntaxError: '(' was never closed")
    assert "Traceback" not in err and "runpy" not in err and "torchlens_edu" not in err


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_debug_listen_port_out_of_range(capsys, port):
    code, _, err = _run(capsys, "debug", "--listen", port, "--device", "cpu")
    assert code == 2
    assert f"argument --listen: a port is 0 to 65535 (0: any free port), got {port}" in \
        _one_error(err)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                      "time.sleep(30)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child the terminal's default, as Ctrl-C has.
    done = subprocess.run([sys.executable, "-m", "torchlens_edu.cli", "debug", str(script)],
                          env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130 == 128 + signal.SIGINT
    assert done.stderr.strip() == "interrupted"


# --- every subcommand goes through the same handler -----------------------------------------

def _raising(error: BaseException):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_in_every_subcommand(capsys, monkeypatch, command):
    module = importlib.import_module(f"torchlens_edu.commands.{command}")
    monkeypatch.setattr(module, "run", _raising(KeyboardInterrupt()))
    argv = {"debug": ["debug"], "demo": ["demo"], "generate": ["generate", "hi"],
            "trace": ["trace", "hi"], "vscode": ["vscode", "init"]}[command]
    code, _, err = _run(capsys, *argv)
    assert code == 130 and err.strip() == "interrupted"


@pytest.mark.parametrize("error, code, words", [
    (FileNotFoundError(2, "No such file or directory", "data.json"), 1,
     "error: data.json: No such file or directory"),
    (ValueError("n_head=0: give a positive number of heads"), 1,
     "error: n_head=0: give a positive number of heads"),
    (bdb.BdbQuit(), 1, "error: stopped: you quit the debugger"),
    (MemoryError(), 1, "error: MemoryError"),
])
def test_known_errors_become_one_line(capsys, monkeypatch, error, code, words):
    from torchlens_edu.commands import trace

    monkeypatch.setattr(trace, "run", _raising(error))
    got, _, err = _run(capsys, "trace", "hi")
    assert got == code and _one_error(err) == words


def test_device_unavailable_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    code, _, err = _run(capsys, "debug", "--device", "cuda")
    assert code == 1 and "CUDA is not available" in _one_error(err)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only errors about the user's input are shortened: a bug must stay reportable."""
    from torchlens_edu.commands import trace

    monkeypatch.setattr(trace, "run", _raising(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        main(["trace", "hi"])


def test_demo_missing_model(capsys, tmp_path):
    code, _, err = _run(capsys, "demo", "--model", str(tmp_path / "nope"))
    assert code == 1 and "no such file or directory" in _one_error(err)


def test_generate_missing_model(capsys, tmp_path):
    code, _, err = _run(capsys, "generate", "hi", "--model", str(tmp_path / "nope"))
    assert code == 1 and "no such file or directory" in _one_error(err)


def test_vscode_missing_folder(capsys, tmp_path):
    code, _, err = _run(capsys, "vscode", "init", str(tmp_path / "nope"))
    assert code == 1 and "does not exist; give the folder you open in VS Code" in _one_error(err)

"""A real debugger session, headless: the shipped launch configurations driven through debugpy's
adapter exactly as VS Code drives them (see support/dap_client.py), asserting what the learner
sees."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from support.dap_client import (
    DAPClient,
    as_vscode_would,
    shipped_configuration,
    source_path,
    substitute,
)
from torchlens_edu.printing import describe

GPT2_PY = (Path(__file__).parents[1] / "torchlens_edu" / "models" / "gpt2.py").resolve()
DEBUG_PY = (Path(__file__).parents[1] / "torchlens_edu" / "debug.py").resolve()
EMBEDDED = Path(__file__).parents[1] / "torchlens_edu" / "data" / "embedded"

TINY_SCRIPT = """
import torch
from torchlens_edu.models import GPT2, GPT2Config

torch.manual_seed(0)
model = GPT2(GPT2Config.preset("tiny")).eval()  # nh=2, hs=16
with torch.no_grad():
    logits = model(torch.zeros(1, 5, dtype=torch.long))
print("logits", tuple(logits.shape))
"""

HF_SCRIPT = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import torchlens_edu as tle

torch.manual_seed(0)
config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                    bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config).eval()  # random weights, built offline from a config
ids = torch.arange(6)[None]
tle.debug.listen(0, wait_for_client=True)  # after the slow imports: they run untraced
with tle.debug.stop_at_module(model, "transformer.h.1.mlp"), torch.no_grad():
    out = model(ids)
print("logits", tuple(out.logits.shape))
"""


def _attention_stop_checks(dap: DAPClient, shape: tuple[int, int, int, int]) -> int:
    """The attention stop as the learner sees it; returns the thread id."""
    thread, frame = dap.stopped()
    assert source_path(frame) == GPT2_PY, dap.diagnostics()
    assert frame["name"] == "forward"
    line = GPT2_PY.read_text().splitlines()[frame["line"] - 1]
    assert "att = self.attn_dropout(att)" in line  # right after the stop-point line
    local = dap.locals(frame["id"])
    assert {"q", "k", "v", "scores", "att", "self"} <= set(local)
    assert dap.evaluate("q.shape", frame["id"]) == f"torch.Size({list(shape)})"
    assert local["q"]["value"] == describe(torch.empty(shape), stats=False)  # our summary line
    assert dap.evaluate("att[0, 0, 0]", frame["id"]).startswith("tensor([1., 0., 0.")  # values
    children = dap.children(local["att"]["variablesReference"])
    assert {"shape", "dtype", "device", "requires_grad", "grad"} <= set(children)
    assert children["dtype"]["value"] == "torch.float32"
    dap.request("next", {"threadId": thread})
    _, after = dap.stopped()
    assert after["line"] == frame["line"] + 1 and source_path(after) == GPT2_PY
    return thread


def _finish(dap: DAPClient, thread: int) -> None:
    dap.request("continue", {"threadId": thread})
    assert dap.event("exited")["exitCode"] == 0, dap.diagnostics()
    dap.event("terminated")


@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED / "config.json").exists(), reason="embedded model not built")
def test_cpu_configuration_stops_inside_attention(tmp_path):
    config = json.loads((EMBEDDED / "config.json").read_text())
    from torchlens_edu.commands.debug import DEFAULT_PROMPT
    from torchlens_edu.models import get_tokenizer

    T = len(get_tokenizer("embedded").encode(DEFAULT_PROMPT))
    nh = config["n_head"]
    shape = (1, nh, T, config["n_embd"] // nh)
    launch = shipped_configuration("attention (CPU)")
    launch = as_vscode_would(substitute(launch, {"workspaceFolder": str(tmp_path)}), str(tmp_path))
    with DAPClient.launch_adapter() as dap:
        dap.initialize()
        dap.start(launch)
        _finish(dap, _attention_stop_checks(dap, shape))


@pytest.mark.slow
def test_current_file_configuration_with_a_stop_in_the_file(tmp_path):
    script = tmp_path / "lesson.py"
    script.write_text("import torchlens_edu as tle\ntle.stop_at('attention', layer=1)\n"
                      + TINY_SCRIPT)
    launch = shipped_configuration("current file")
    variables = {"workspaceFolder": str(tmp_path), "file": str(script),
                 "fileDirname": str(tmp_path)}
    launch = as_vscode_would(substitute(launch, variables), str(tmp_path))
    with DAPClient.launch_adapter() as dap:
        dap.initialize()
        dap.start(launch)
        _finish(dap, _attention_stop_checks(dap, (1, 2, 5, 16)))
        assert "logits (1, 5, 256)" in dap.terminal_output


@pytest.mark.slow
def test_a_breakpoint_on_the_explicit_path_is_hit_without_any_toolkit_call(tmp_path):
    """F5 with VS Code's plain "Python File" configuration on a script that only builds and
    runs the model: the debugger alone makes attention take the explicit path."""
    script = tmp_path / "plain.py"
    script.write_text(TINY_SCRIPT)
    softmax = next(i for i, text in enumerate(GPT2_PY.read_text().splitlines(), 1)
                   if "F.softmax(scores, dim=-1)" in text)
    launch = {"name": "Python File", "type": "debugpy", "request": "launch",
              "program": str(script), "cwd": str(tmp_path), "console": "integratedTerminal",
              "justMyCode": False, "pythonArgs": ["-Xfrozen_modules=off"]}
    with DAPClient.launch_adapter() as dap:
        dap.initialize()
        dap.start(launch, breakpoints={GPT2_PY: [softmax]})
        thread, frame = dap.stopped()
        assert source_path(frame) == GPT2_PY and frame["line"] == softmax, dap.diagnostics()
        assert dap.evaluate("scores.shape", frame["id"]) == "torch.Size([1, 2, 5, 5])"
        assert dap.evaluate("self.layer_idx", frame["id"]) == "0"
        dap.request("setBreakpoints", {"source": {"path": str(GPT2_PY)}, "breakpoints": []})
        _finish(dap, thread)
        assert "logits (1, 5, 256)" in dap.terminal_output


@pytest.mark.slow
def test_stop_at_module_on_a_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    script = tmp_path / "hf_lesson.py"
    script.write_text(HF_SCRIPT)
    with _debuggee([sys.executable, "-Xfrozen_modules=off", str(script)]) as debuggee:
        with _attach(_listening_port(debuggee)) as dap:
            thread, frame = dap.stopped()
            assert source_path(frame) == DEBUG_PY and frame["name"] == "forward_stop"
            local = dap.locals(frame["id"])
            assert {"module", "inputs", "kwargs", "output"} <= set(local)
            assert dap.evaluate("type(module).__name__", frame["id"]) == "'GPT2MLP'"
            assert dap.evaluate("output.shape", frame["id"]) == "torch.Size([1, 6, 32])"
            assert local["output"]["value"] == describe(torch.empty(1, 6, 32), stats=False)
            dap.request("continue", {"threadId": thread})
            assert debuggee.wait(timeout=60) == 0
        assert "logits (1, 6, 64)" in _output(debuggee)


@pytest.mark.slow
def test_attach_to_listen(tmp_path):
    script = tmp_path / "lesson.py"
    script.write_text(TINY_SCRIPT)
    command = [sys.executable, "-Xfrozen_modules=off", "-m", "torchlens_edu.cli", "debug",
               "--listen", "0", "--wait-for-client", str(script)]
    with (_debuggee(command, TORCHLENS_EDU_STOP="attention:layer=0") as debuggee,
          _attach(_listening_port(debuggee)) as dap):
        thread, frame = dap.stopped()
        assert source_path(frame) == GPT2_PY and frame["name"] == "forward"
        assert dap.evaluate("k.shape", frame["id"]) == "torch.Size([1, 2, 5, 16])"
        dap.request("continue", {"threadId": thread})
        assert debuggee.wait(timeout=60) == 0


@contextmanager
def _debuggee(command: list[str], **env: str) -> Iterator[subprocess.Popen]:
    """A process that runs ``command`` (stdin closed, output in ``proc.log``, a file: a pipe
    would block readers while debugpy's adapter subprocess keeps it open); killed at the end."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})
        proc.log = log
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read().decode("utf-8", "replace")


def _attach(port: int) -> DAPClient:
    """Attach with the shipped configuration, on ``port`` instead of 5678 (tests may run in
    parallel, so each debuggee listens on a free port)."""
    attach = shipped_configuration("Attach")
    assert attach["connect"] == {"host": "127.0.0.1", "port": 5678}
    dap = DAPClient.connect("127.0.0.1", port)
    try:
        dap.initialize()
        dap.start({**attach, "connect": {"host": "127.0.0.1", "port": port}})
    except BaseException:
        dap.close()
        raise
    return dap


def _listening_port(proc: subprocess.Popen, timeout: float = 90) -> int:
    """The port the debuggee says it listens on (it prints this before it waits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", _output(proc))
        if found:
            return int(found.group(1))
        time.sleep(0.2)
    raise AssertionError(f"the debuggee never said where it listens:\n{_output(proc)}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not (EMBEDDED / "config.json").exists(), reason="embedded model not built")
def test_gpu_configuration_stops_inside_attention(tmp_path):
    config = json.loads((EMBEDDED / "config.json").read_text())
    from torchlens_edu.commands.debug import DEFAULT_PROMPT
    from torchlens_edu.models import get_tokenizer

    T = len(get_tokenizer("embedded").encode(DEFAULT_PROMPT))
    nh = config["n_head"]
    launch = shipped_configuration("attention (GPU)")
    variables = {"workspaceFolder": str(tmp_path), "input:gpuDevice": "cuda"}
    launch = as_vscode_would(substitute(launch, variables), str(tmp_path))
    with DAPClient.launch_adapter() as dap:
        dap.initialize()
        dap.start(launch)
        thread, frame = dap.stopped()
        assert source_path(frame) == GPT2_PY and frame["name"] == "forward"
        assert dap.evaluate("q.device.type", frame["id"]) == "'cuda'"
        value = dap.locals(frame["id"])["q"]["value"]
        assert value == describe(torch.empty(1, nh, T, config["n_embd"] // nh, device="cuda"),
                                 stats=False)
        _finish(dap, thread)


def test_gpu_configuration_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from torchlens_edu.cli import main

    launch = substitute(shipped_configuration("attention (GPU)"), {"input:gpuDevice": "cuda"})
    assert launch["module"] == "torchlens_edu.cli"
    assert main(launch["args"]) == 1  # as every subcommand: the device is not there
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # one message (rich may wrap it)


def test_substitute_reports_unknown_variables():
    with pytest.raises(KeyError, match="selectedText"):
        substitute(textwrap.dedent("${selectedText}"), {})

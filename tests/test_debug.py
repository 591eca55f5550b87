"""Stop points without a real debugger: where they pause, what the frame holds, when they are
skipped, and how they are switched on and off. (tests/test_vscode_dap.py drives real debugpy.)"""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle
from torchlens_edu import debug
from torchlens_edu._core.modules import PatternError
from torchlens_edu.cli import main
from torchlens_edu.printing import describe

GPT2_PY = Path(debug.__file__).parent / "models" / "gpt2.py"
PLUGIN = Path(__file__).parents[1] / "pydevd_plugins" / "extensions" / \
    "pydevd_plugin_torchlens_edu.py"


@pytest.fixture(autouse=True)
def _no_stops(monkeypatch):
    monkeypatch.delenv(debug.ENV_VAR, raising=False)
    monkeypatch.delenv("CI", raising=False)
    debug._warned.clear()
    yield
    debug.clear_stops()


@pytest.fixture
def paused(monkeypatch):
    """Stand-in for a debugger: records the frame each pause would stop in (a module stop's
    ``breakpoint()`` stops in its caller; a stop point names the model's frame)."""
    frames = []

    def hook(*args, **kwargs):
        frames.append(sys._getframe(1))  # the caller of breakpoint(): where a debugger stops

    monkeypatch.setattr(sys, "breakpointhook", hook)
    monkeypatch.setattr(debug, "_pause_in", frames.append)
    return frames


def test_parse_stops_and_clear_errors():
    assert debug.parse_stops("attention:layer=3,head=1; attention") == [
        debug.StopRequest("attention", layer=3, head=1), debug.StopRequest("attention")]
    with pytest.raises(ValueError, match="did you mean 'attention'"):
        debug.parse_stops("atention")
    with pytest.raises(ValueError, match="attention:layer=3,head=1"):
        debug.parse_stops("attention:layer=x")
    with pytest.raises(ValueError, match=">= 0"):
        tle.stop_at("attention", layer=-1)


def test_stop_at_is_a_removable_context_manager(monkeypatch):
    with tle.stop_at("attention", layer=1) as stop:
        assert debug.stop_requested("attention", layer=1)
        assert not debug.stop_requested("attention", layer=0)
    assert not debug.stop_requested("attention", layer=1)
    stop.remove()  # twice is fine
    monkeypatch.setenv(debug.ENV_VAR, "attention:layer=0")
    assert debug.stop_requested("attention", layer=0)


def test_attention_stop_pauses_in_the_attention_frame(tiny_gpt2, tiny_ids, paused, capsys):
    with tle.stop_at("attention", layer=1, head=1), torch.no_grad():
        tiny_gpt2(tiny_ids)
    assert len(paused) == 1
    frame = paused[0]
    assert Path(frame.f_code.co_filename) == GPT2_PY and frame.f_code.co_name == "forward"
    assert {"q", "k", "v", "scores", "att"} <= set(frame.f_locals)
    assert frame.f_locals["att"].shape == (2, 2, 8, 8)  # (B, nh, T, Tk)
    assert frame.f_locals["self"].layer_idx == 1
    err = capsys.readouterr().err
    assert "stop point 'attention' (layer 1)" in err and "att[:, 1]" in err


def test_without_debugger_or_terminal_the_stop_is_skipped_once(tiny_gpt2, tiny_ids, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(sys, "breakpointhook", sys.__breakpointhook__)  # plain pdb
    monkeypatch.setenv(debug.ENV_VAR, "attention")
    debug.read_env()  # as `import torchlens_edu` does when the variable is set
    with torch.no_grad():
        out = tiny_gpt2(tiny_ids)
        tiny_gpt2(tiny_ids)
    assert out.shape == (2, 8, 256)
    err = capsys.readouterr().err
    assert err.count("skipped the stop point 'attention'") == 1  # not once per layer or call
    assert "stdin is not a terminal" in err


def test_terminal_without_debugger_opens_pdb_there(monkeypatch):
    monkeypatch.setattr(sys, "breakpointhook", sys.__breakpointhook__)
    monkeypatch.setattr(debug, "_stdin_interactive", lambda: True)
    assert debug._pause_blocker() is None
    monkeypatch.setenv("CI", "true")  # CI never waits on pdb, even with a terminal
    assert debug._pause_blocker() is not None


def test_stop_at_module_forward_locals_and_condition(paused):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with debug.stop_at_module(model, "2") as stop:
        model(x)
    assert stop.paths == ["2"] and len(paused) == 1
    local = paused[0].f_locals
    assert local["module"] is model[2] and local["inputs"][0].shape == (5, 3)
    assert local["output"].shape == (5, 2)
    assert not model[2]._forward_hooks  # removed on exit
    with tle.stop_at_module(model, "*", condition=lambda m, i, o: isinstance(m, nn.ReLU)):
        model(x)
    assert len(paused) == 2 and isinstance(paused[1].f_locals["module"], nn.ReLU)


def test_stop_at_module_backward_has_the_gradients(tiny_gpt2, tiny_ids, paused):
    with debug.stop_at_module(tiny_gpt2, "transformer.h.1.mlp", when="backward"):
        tiny_gpt2(tiny_ids).sum().backward()
    assert len(paused) == 1
    local = paused[0].f_locals
    assert local["grad_output"][0].shape == (2, 8, 32)
    assert {"module", "grad_input"} <= set(local)


def test_stop_at_module_bad_input():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(PatternError, match="matches no module"):
        debug.stop_at_module(model, "transformer.h.0")
    with pytest.raises(ValueError, match="'forward'"):
        debug.stop_at_module(model, "0", when="backwards")
    with pytest.raises(TypeError, match="condition"):
        debug.stop_at_module(model, "0", condition=True)
    # refused when made, not at the first forward with "takes 1 positional argument"
    with pytest.raises(TypeError) as info:
        debug.stop_at_module(model, "0", condition=lambda module: True)
    assert str(info.value) == ("condition must take three arguments (module, inputs, output) "
                               "and return a bool; <lambda>(module) cannot be called with three: "
                               "write e.g. lambda module, inputs, output: ...")
    with pytest.raises(TypeError, match=r"three arguments \(module, grad_input, grad_output\)"):
        debug.stop_at_module(model, "0", when="backward", condition=lambda m, g: True)


def test_a_stop_point_that_is_not_a_name_says_what_to_give():
    with pytest.raises(TypeError) as info:
        tle.stop_at(None)  # type: ignore[arg-type]
    assert str(info.value) == "a stop point is a name ('attention'), not NoneType None"
    assert not debug.requested_stops()


def test_cli_flags(tmp_path, capsys):
    assert main(["debug", "--stop", "atention", "--device", "cpu"]) == 2
    assert "did you mean 'attention'" in capsys.readouterr().err
    assert main(["debug", "--wait-for-client", "--device", "cpu"]) == 2
    assert "needs --listen" in capsys.readouterr().err
    assert main(["debug", str(tmp_path / "missing.py")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_debug_command_runs_a_script_with_print_options(tmp_path, capsys):
    script = tmp_path / "lesson.py"
    script.write_text("import sys, torch\nprint(torch._tensor_str.PRINT_OPTS.threshold, "
                      "sys.argv[1:])\nsys.exit(3)\n")
    assert main(["debug", "--print", "edu", str(script), "a", "--b"]) == 3
    assert "30 ['a', '--b']" in capsys.readouterr().out  # edu preset inside, restored after


def test_debug_command_runs_gpt2_to_the_end(capsys):
    assert main(["debug", "--device", "cpu", "--prompt", "Hello"]) == 0
    assert "most likely next token after 'Hello'" in capsys.readouterr().out


def test_pydevd_plugin_shows_the_metadata_summary():
    from debugpy._vendored import vendored

    with vendored("pydevd"):  # its extension API, without starting a debugger
        spec = importlib.util.spec_from_file_location("tle_pydevd_plugin", PLUGIN)
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
    summary, children = plugin.TensorSummary(), plugin.TensorChildren()
    t = torch.zeros(2, 3, requires_grad=True)
    assert summary.can_provide(torch.Tensor, "Tensor")
    assert summary.can_provide(nn.Parameter, "Parameter") and not summary.can_provide(int, "int")
    assert summary.get_str(t) == describe(t, stats=False)
    assert summary.get_str_in_context(t, "hover") == describe(t, stats=False)
    assert summary.get_str_in_context(t, "repl") == repr(t)  # the Debug Console shows values
    shown = children.get_dictionary(t)
    assert shown["shape"] == (2, 3) and shown["requires_grad"] is True and shown["grad"] is None
    assert shown["stats"].numel == 6 and children.resolve(t, "dtype") == torch.float32
    meta = torch.empty(4, device="meta")  # no data: nothing may be read
    assert "stats" not in children.get_dictionary(meta)
    assert "meta" in summary.get_str(meta)


@pytest.mark.slow
def test_listening_without_a_client_skips_the_stop(tmp_path):
    """After listen() (no wait) and before VS Code attaches, a stop says so and goes on."""
    import subprocess

    script = tmp_path / "lesson.py"
    script.write_text("import torch, torchlens_edu as tle\n"
                      "from torchlens_edu.models import GPT2, GPT2Config\n"
                      "tle.debug.listen(0)\n"
                      "assert tle.debug.listen(0) == tle.debug._listening  # served once\n"
                      "tle.stop_at('attention')\n"
                      "with torch.no_grad():\n"
                      "    GPT2(GPT2Config.preset('tiny'))(torch.zeros(1, 3, dtype=torch.long))\n")
    done = subprocess.run([sys.executable, "-Xfrozen_modules=off", str(script)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "listening on 127.0.0.1:" in done.stderr
    assert done.stderr.count("skipped the stop point 'attention'") == 1
    assert "no debugger is attached yet" in done.stderr and "⏸" not in done.stderr


def _line_of(text: str) -> int:
    return next(i for i, line in enumerate(GPT2_PY.read_text().splitlines(), 1) if text in line)


def test_attention_stop_opens_pdb_on_the_line_after_the_hook_point(tiny_gpt2, tiny_ids, capsys,
                                                                    monkeypatch):
    # real pdb, driven through stdin: it stops in gpt2.py's attention frame, not in a hook
    monkeypatch.setattr(sys, "breakpointhook", sys.__breakpointhook__)
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    monkeypatch.setattr(debug, "_stdin_interactive", lambda: True)
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        "p sorted(set(locals()) & {'q', 'k', 'v', 'scores', 'att'})\n"
        "p tuple(att.shape), self.layer_idx\nc\n"))
    with tle.stop_at("attention", layer=1), torch.no_grad():
        out = tiny_gpt2(tiny_ids)
    assert sys.gettrace() is None  # pdb's `c` left no tracer behind
    assert out.shape == (2, 8, 256)
    printed = capsys.readouterr().out
    assert f"gpt2.py({_line_of('att = self.attn_dropout(att)')})forward()" in printed
    assert "['att', 'k', 'q', 'scores', 'v']" in printed
    assert "((2, 2, 8, 8), 1)" in printed
    assert printed.count("(Pdb)") == 3  # one stop (layer 1 only), three commands


def test_stops_hook_the_model_only_while_requested(tiny_gpt2, tiny_ids, paused):
    hooks = torch.nn.modules.module._global_forward_hooks
    before = len(hooks)
    with tle.stop_at("attention", layer=0):
        assert len(hooks) == before + 1  # one process-wide hook, whatever the number of stops
        with tle.stop_at("attention", layer=1):
            assert len(hooks) == before + 1
    assert len(hooks) == before  # no stop, no hook: the fast path is back
    with pytest.raises(KeyboardInterrupt), tle.stop_at("attention"):
        raise KeyboardInterrupt
    assert len(hooks) == before


def test_env_stop_garbage_warns_once_and_never_breaks_a_forward(tiny_gpt2, tiny_ids, capsys,
                                                               monkeypatch):
    monkeypatch.setenv(debug.ENV_VAR, "garbage")
    debug.read_env()
    debug.read_env()  # the same value again: read once
    with torch.no_grad():
        assert tiny_gpt2(tiny_ids).shape == (2, 8, 256)
    assert tiny_gpt2.generate(tiny_ids[:1, :3], 2, temperature=0).shape == (1, 5)
    assert tle.trace_shapes(tiny_gpt2, tiny_ids).events
    err = capsys.readouterr().err
    assert err.count("ignoring $TORCHLENS_EDU_STOP='garbage'") == 1
    assert "unknown stop point 'garbage'" in err
    assert "Valid forms: attention, attention:layer=L or attention:layer=L,head=H" in err
    assert not debug.requested_stops()


def test_env_stop_out_of_range_says_the_valid_range(tiny_gpt2, tiny_ids, paused, capsys,
                                                   monkeypatch):
    monkeypatch.setenv(debug.ENV_VAR, "attention:layer=7;attention:head=9")
    debug.read_env()
    with torch.no_grad():
        tiny_gpt2(tiny_ids)
        tiny_gpt2(tiny_ids)
    err = capsys.readouterr().err
    assert err.count("attention:layer=7 never stops: the model has 2 layers, so layer is 0 "
                     "to 1") == 1
    assert err.count("attention:head=9 names no head: the model has 2 heads, so head is 0 "
                     "to 1") == 1
    assert len(paused) == 4  # the head=9 stop still pauses: two forwards, two layers each


def test_clear_stops_also_clears_the_stop_from_the_environment(tiny_gpt2, tiny_ids, paused,
                                                               monkeypatch):
    monkeypatch.setenv(debug.ENV_VAR, "attention:layer=0")
    debug.read_env()
    with torch.no_grad():
        tiny_gpt2(tiny_ids)
    assert len(paused) == 1
    debug.clear_stops()  # lesson 05 does this after its first forward
    with torch.no_grad():
        tiny_gpt2(tiny_ids)
        tle.trace_shapes(tiny_gpt2, tiny_ids, ops=True)
    assert len(paused) == 1  # the variable still holds the value, but it was cleared
    assert not debug.requested_stops()
    monkeypatch.setenv(debug.ENV_VAR, "attention:layer=1")  # a new value is a new request
    assert debug.requested_stops() == [debug.StopRequest("attention", layer=1)]


def test_cli_stop_out_of_range_is_a_clear_error(capsys):
    pytest.importorskip("tiktoken")
    assert main(["debug", "--stop", "attention:layer=7", "--device", "cpu"]) == 2
    assert ("--stop attention:layer=7 never stops: the model has 4 layers, so layer is 0 to 3"
            in capsys.readouterr().err)
    assert main(["debug", "--stop", "attention:layer=1,head=9", "--device", "cpu"]) == 2
    assert "the model has 4 heads, so head is 0 to 3" in capsys.readouterr().err
    assert not debug.requested_stops()  # nothing left behind


def test_attention_stop_under_another_debugger_says_how_far_up(tiny_gpt2, tiny_ids, monkeypatch,
                                                               capsys):
    # a breakpointhook we cannot aim (IPython's, PyCharm's): it pauses in our frame, and the
    # message says how many frames up the model's locals are
    frames = []
    monkeypatch.setattr(sys, "breakpointhook", lambda: frames.append(sys._getframe(1)))
    with tle.stop_at("attention", layer=0), torch.no_grad():
        tiny_gpt2(tiny_ids)
    assert len(frames) == 1
    up = int(re.search(r"type `up (\d+)`", capsys.readouterr().err).group(1))
    frame = frames[0]
    for _ in range(up):
        frame = frame.f_back
    assert Path(frame.f_code.co_filename) == GPT2_PY and {"q", "att"} <= set(frame.f_locals)


def test_the_attention_stop_prints_as_lesson_01_does(monkeypatch, capsys):
    # real pdb at `torchlens-edu debug`'s stop: its default preset is lesson 01's "edu", so a
    # learner's `p att[0, 0, :4, :4]` reads 0.6480, not 6.4804e-01
    monkeypatch.setattr(sys, "breakpointhook", sys.__breakpointhook__)
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    monkeypatch.setattr(debug, "_stdin_interactive", lambda: True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("p att[0, 0, :4, :4]\np att[0, 0, -1]\nc\n"))
    assert main(["debug", "--device", "cpu", "--stop", "attention:layer=0"]) == 0
    printed = capsys.readouterr().out
    square, row = printed.split("(Pdb)")[1:3]  # the last query's row spans 1e-06 .. 0.5
    assert re.search(r"0\.\d{4}", square) and "e-" not in square and "e-" not in row, printed
    lesson = (Path(__file__).parents[1] / "demos" / "01_tensors_and_print_options.py").read_text()
    assert 'tle.printoptions("edu")' in lesson and "sci_mode=False" in lesson

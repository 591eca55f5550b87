"""The %trace_shapes magic: in an IPython test shell, and in a real `ipython --ext` process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from torchlens_edu.models import GPT2, GPT2Config
from torchlens_edu.shapes import ShapeTrace


@pytest.fixture(scope="module")
def shell():
    ip = InteractiveShell.instance()
    ip.extension_manager.load_extension("torchlens_edu")
    torch.manual_seed(0)
    ip.user_ns["torch"] = torch
    ip.user_ns["model"] = GPT2(GPT2Config.preset("tiny")).eval()
    ip.user_ns["x"] = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    yield ip
    ip.extension_manager.unload_extension("torchlens_edu")


def _global_hooks() -> int:
    module = torch.nn.modules.module
    return len(module._global_forward_pre_hooks) + len(module._global_forward_hooks)


def _run(shell, code: str):
    before = _global_hooks()
    result = shell.run_cell(code, store_history=False)
    assert _global_hooks() == before  # the discovery hook is gone again
    return result


def test_line_magic_traces_ops_and_stores_the_trace(shell, capsys):
    result = _run(shell, "%trace_shapes --ops -o tr model(x)")
    assert result.error_in_exec is None
    out = capsys.readouterr().out
    assert "q = q.view(B, T, nh, hs).transpose(1, 2)" in out
    assert "(x2, identical shapes)" in out
    trace = shell.user_ns["tr"]
    assert isinstance(trace, ShapeTrace) and trace.ops and trace.roots == ["GPT2"]
    model = shell.user_ns["model"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_cell_magic_with_options_and_quoted_values(shell, capsys):
    code = ('%%trace_shapes --meta --depth 1 --dims "B=2,T=8" -o tr2\n'
            "logits = model(x)\nlast = logits[:, -1]\n")
    result = _run(shell, code)
    assert result.error_in_exec is None
    trace = shell.user_ns["tr2"]
    assert trace.meta and {e.path for e in trace.events} >= {"", "lm_head", "transformer.h.1"}
    assert "transformer.h.0.attn" not in {e.path for e in trace.events}
    assert shell.user_ns["logits"].is_meta  # the cell ran on meta tensors
    assert re.search(r" \d+(\.\d+)? [kMGT]?FLOP ", capsys.readouterr().out)  # e.g. 1.2 MFLOP


def test_meta_cell_gives_a_module_shared_by_two_parents_its_weights_back(shell):
    from support.zoo import ModelGuard, SharedHead

    shell.user_ns["shared"] = model = SharedHead()
    guard = ModelGuard(model)
    result = _run(shell, "%trace_shapes --meta shared(x % 16)")
    assert result.error_in_exec is None
    guard.check()
    assert not model(torch.zeros(1, 3, dtype=torch.long)).is_meta


def test_models_called_without_a_name_are_discovered(shell, capsys):
    shell.user_ns["zoo"] = {"gpt": shell.user_ns["model"]}
    result = _run(shell, '%trace_shapes -o tr3 zoo["gpt"](x[:1])')
    assert result.error_in_exec is None
    trace = shell.user_ns["tr3"]
    assert trace.events[0].name == "GPT2" and trace.events[0].output_shapes == [(1, 8, 256)]
    assert trace.modules("transformer.h.1.mlp")


def test_errors_are_explained_reraised_and_the_partial_trace_kept(shell, capsys):
    shell.user_ns["bad"] = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(3, 2))
    result = _run(shell, "%trace_shapes -o tr4 bad(torch.zeros(2, 8))")
    assert isinstance(result.error_in_exec, RuntimeError)
    assert "in_features" in "\n".join(result.error_in_exec.__notes__)
    trace = shell.user_ns["tr4"]
    assert trace.modules("0")[0].output_shapes == [(2, 4)] and trace.modules("1")[0].failed
    assert "✗ failed" in capsys.readouterr().out


def test_errors_outside_the_model_get_no_shape_note(shell, capsys):
    error = _run(shell, "%trace_shapes model(x) + undefined_name").error_in_exec
    assert isinstance(error, NameError) and not getattr(error, "__notes__", None)


def test_bad_usage_is_reported(shell, capsys):
    assert "nothing to trace" in str(_run(shell, "%trace_shapes --ops").error_in_exec)
    assert "B=2,T=16" in str(_run(shell, "%trace_shapes --dims B2 model(x)").error_in_exec)
    error = _run(shell, "%trace_shapes --include transformer.h.*.atn model(x)").error_in_exec
    assert "Did you mean" in str(error)


def test_help_lists_the_options(shell, capsys):
    doc = shell.find_line_magic("trace_shapes").__doc__
    for option in ("--ops", "--meta", "--depth", "--include", "--dims", "-o"):
        assert option in doc
    shell.run_cell("%trace_shapes?", store_history=False)
    assert "--include" in capsys.readouterr().out


def test_html_for_jupyter(shell):
    _run(shell, "%trace_shapes -o tr5 model(x)")
    html = shell.user_ns["tr5"]._repr_html_()
    assert html.startswith("<") and "transformer.h.0..1" in html


def test_unload_removes_the_magic():
    ip = InteractiveShell.instance()
    ip.extension_manager.load_extension("torchlens_edu")
    ip.extension_manager.unload_extension("torchlens_edu")
    assert ip.find_line_magic("trace_shapes") is None
    assert ip.find_cell_magic("trace_shapes") is None
    ip.extension_manager.load_extension("torchlens_edu")  # and loads again cleanly
    assert ip.find_line_magic("trace_shapes") is not None


@pytest.mark.slow
def test_magic_in_a_real_ipython_process():
    code = ("import torch\n"
            "from torchlens_edu.models import GPT2, GPT2Config\n"
            "m = GPT2(GPT2Config.preset('tiny')).eval()\n"
            "%trace_shapes --depth 1 m(torch.zeros(1, 4, dtype=torch.long))\n")
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "IPython", "--ext", "torchlens_edu",
                           "--colors=NoColor", "-c", code], capture_output=True, text=True,
                          timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert "ShapeTrace of GPT2" in done.stdout
    assert "lm_head Linear  (B=1, T=4, C=32) -> (B=1, T=4, V=256)" in done.stdout


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_unknown_options_are_usage_errors_and_nothing_runs(shell, capsys):
    error = _run(shell, "%trace_shapes --bogus model(x)").error_in_exec
    assert isinstance(error, UsageError)
    assert "unknown option --bogus; the options are --ops, --meta" in str(error)
    out = _plain(capsys.readouterr().out)
    assert "ShapeTrace" not in out and "SyntaxError" not in out
    error = _run(shell, "%%trace_shapes --ops --bogus\nmodel(x)\n").error_in_exec
    assert isinstance(error, UsageError) and "unknown option --bogus" in str(error)
    error = _run(shell, "%%trace_shapes --ops model(x)\nmodel(x)\n").error_in_exec
    assert isinstance(error, UsageError) and "'model(x)' on the magic's line" in str(error)


def test_a_pattern_that_matches_nothing_is_a_usage_error(shell, capsys):
    error = _run(shell, "%trace_shapes --include nope model(x)").error_in_exec
    assert isinstance(error, UsageError)
    assert str(error).startswith("%trace_shapes: ") and "'nope'" in str(error)
    assert "ShapeTrace" not in capsys.readouterr().out


def test_a_syntax_error_is_reported_once(shell, capsys):
    error = _run(shell, "%trace_shapes model(x))").error_in_exec
    assert isinstance(error, SyntaxError) and error.__context__ is None
    assert "ShapeTrace" not in capsys.readouterr().out


def test_an_error_in_the_traced_code_shows_the_users_frames(shell, capsys):
    shell.user_ns["bad"] = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(3, 2))
    capsys.readouterr()
    result = _run(shell, "%trace_shapes --ops bad(torch.zeros(2, 8))")
    assert isinstance(result.error_in_exec, RuntimeError)
    out = _plain(capsys.readouterr().out)
    trace_at, error_at = out.index("ShapeTrace of Sequential"), out.index("RuntimeError")
    assert trace_at < error_at  # the partial trace, then the error
    # the explanation names the cell as IPython does, not by its file name
    assert re.search(r"at Cell In\[\d+\], line 1  bad\(torch.zeros\(2, 8\)\)", out), out
    assert "ipython-input" not in out[:error_at]
    shown = out[error_at - 2000:]
    assert "integrations/ipython.py" not in shown and "trace_shapes(self" not in shown
    assert "shapes/ops.py" not in shown and "__torch_function__" not in shown
    # the cell is named as IPython names its own cells
    assert re.search(r"Cell In\[\d+\]|<ipython-input-\d+-", shown), shown


def test_an_error_before_any_model_ran_prints_no_empty_trace(shell, capsys):
    error = _run(shell, "%trace_shapes --ops undefined_function(x)").error_in_exec
    assert isinstance(error, NameError)
    assert "ShapeTrace" not in _plain(capsys.readouterr().out)


def test_code_that_calls_no_model_says_so(shell, capsys):
    assert _run(shell, "%trace_shapes 1 + 1").error_in_exec is None
    assert "the code called no nn.Module" in _plain(capsys.readouterr().out)

"""The user's line of each op, cached per code location (``_core/sites.py``): the same answers as
the walk without a cache, one Site per line, text read only when shown, fresh after a reload,
and a cache that lets go of code objects that are gone. And the tracer's own size reads are no
op for any ``TorchFunctionMode`` (its own op recorder's or the user's)."""

from __future__ import annotations

import gc
import importlib
import linecache
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from support.site_model import traced
from torchlens_edu._core import sites
from torchlens_edu.shapes import trace_shapes
from torchlens_edu.shapes.trace import ShapeTrace

EXPECTED = Path(__file__).parent / "support" / "site_model.expected.txt"


def _describe(trace: ShapeTrace) -> str:
    """The full rendering (times masked) and every event with its line and that line's text."""
    rows = [re.sub(r"\d+\.\d\d ms", "<time> ms", trace.to_text(width=200))]
    for e in trace.events:
        rows.append(f"{e.kind} {e.path or '-'} {e.name} #{e.call} "
                    f"{os.path.basename(e.filename)}:{e.line} {e.code!r} "
                    f"{e.input_shapes} -> {e.output_shapes}")
    return "\n".join(rows) + "\n"


def test_op_trace_is_what_the_uncached_walk_recorded():
    """Loop, recursion, generator, lambda, einops, exec'd <string> code and a nested helper:
    every event, line and text as recorded before the cache (first run fills it, second hits)."""
    expected = EXPECTED.read_text()
    assert _describe(traced(trace_shapes)) == expected
    assert _describe(traced(trace_shapes)) == expected


def test_a_line_run_in_a_loop_has_one_site_for_every_iteration():
    trace = traced(trace_shapes)
    adds = [e for e in trace.events if e.name == "add"]
    assert len(adds) == 3 and adds[0].site is adds[1].site is adds[2].site
    assert adds[0].code == "x = x + self.act(layer(x))  # (B, T, C): one line, three iterations"
    # einops' reshape and permute run inside einops: both land on the one rearrange line
    first = [e for e in trace.events if e.name in ("reshape", "permute")][:2]
    assert first[0].site is first[1].site
    assert first[0].code.startswith('heads = rearrange(x, "b t (h d) -> b h t d"')


def test_source_text_is_read_when_shown_not_while_tracing(monkeypatch):
    reads: list[str] = []
    real = linecache.getline
    monkeypatch.setattr(linecache, "getline", lambda f, n, *a: reads.append(f) or real(f, n, *a))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    trace = trace_shapes(model, torch.zeros(2, 4), ops=True)
    assert reads == []
    text = trace.to_text()
    assert reads and "linear" in text


_BEFORE = """import torch


class Step(torch.nn.Module):
    def forward(self, x):
        return x.relu()  # first version
"""
_AFTER = """import torch


class Step(torch.nn.Module):
    def forward(self, x):
        y = x * 3  # edited: a new line above
        return y.tanh()  # second version, longer than the first
"""


def test_a_reloaded_module_shows_its_new_lines(tmp_path, monkeypatch):
    path = tmp_path / "learner_step.py"
    path.write_text(_BEFORE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no .pyc of the old text is reused
    module = importlib.import_module("learner_step")
    try:
        before = trace_shapes(module.Step(), torch.zeros(3), ops=True)
        assert [(e.name, e.line, e.code) for e in before.events if e.kind == "op"] == [
            ("relu", 6, "return x.relu()  # first version")]
        assert "learner_step.py:6 return x.relu()" in before.to_text()  # linecache has it now

        path.write_text(_AFTER)
        module = importlib.reload(module)
        after = trace_shapes(module.Step(), torch.zeros(3), ops=True)
        assert [(e.name, e.line, e.code) for e in after.events if e.kind == "op"] == [
            ("mul", 6, "y = x * 3  # edited: a new line above"),
            ("tanh", 7, "return y.tanh()  # second version, longer than the first")]
        assert "learner_step.py:7 return y.tanh()" in after.to_text()
    finally:
        sys.modules.pop("learner_step", None)
        linecache.checkcache(str(path))


def test_the_cache_lets_go_of_code_objects_that_are_gone():
    """Code made and dropped again and again (exec'd models, reloads): the cache stays the size
    of the code alive, it does not grow with every code object ever traced."""

    def build(i: int) -> nn.Module:
        namespace: dict = {"nn": nn}
        source = (f"class Made{i}(nn.Module):\n    def forward(self, x):\n"
                  "        return x.relu() + 1\n")
        exec(compile(source, f"/tmp/made_model_{i}.py", "exec"), namespace)
        return namespace[f"Made{i}"]()

    trace_shapes(build(50), torch.zeros(2), ops=True)
    gc.collect()
    baseline = len(sites._codes)
    for i in range(50):
        trace = trace_shapes(build(i), torch.zeros(2), ops=True)
        assert [e.line for e in trace.events if e.kind == "op"] == [3, 3]
        del trace
    gc.collect()
    assert len(sites._codes) <= baseline + 2


@pytest.mark.parametrize("where", ["toolkit", "user"])
def test_code_facts_are_judged_once_per_code_object(where):
    code = sites.code_facts.__code__ if where == "toolkit" else _describe.__code__
    facts = sites.code_facts(code)
    assert facts is sites.code_facts(code)
    assert (facts.user, facts.toolkit) == ((False, True) if where == "toolkit" else (True, False))


def test_source_text_reads_a_file_again_after_it_changed(tmp_path):
    path = tmp_path / "edited.py"
    path.write_text("a = 1\n")
    assert sites.source_text(str(path), 1) == "a = 1"
    path.write_text("b = 22  # longer\n")
    assert sites.source_text(str(path), 1) == "b = 22  # longer"


class _Calls(TorchFunctionMode):
    """A user's own mode: which functions made the torch calls it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        code = sys._getframe(1).f_code
        self.callers.append((os.path.basename(code.co_filename), code.co_name))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ops", [False, True])
def test_the_tracers_size_reads_during_the_forward_reach_no_torch_function_mode(ops):
    """Reading each module's and op's sizes is the tracer's business: a user's mode does not
    see those reads as ops (and they cost no dispatch through a Python mode)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.zeros(2, 4)
    with _Calls() as calls:
        trace = trace_shapes(model, x, ops=ops)
    readers = {"pre", "post", "op_done", "_arg_specs", "_output_specs", "_specs", "<listcomp>",
               "infer"}
    ours = [c for c in calls.callers if c[0] in ("tracer.py", "dims.py") and c[1] in readers]
    assert ours == []
    assert ("linear.py", "forward") in calls.callers or ("ops.py", "__torch_function__") in (
        calls.callers)  # the model's own calls still reach the user's mode
    assert [e.output_shapes for e in trace.events if e.kind == "module"] == [[(2, 4)]] * 3
    if ops:
        assert [e.name for e in trace.events if e.kind == "op"] == ["linear", "relu"]

"""The pytest plugin, run through pytest's own ``pytester``: off by default, each option on."""

from __future__ import annotations

import subprocess
import sys

import _pytest.pytester as _pytester
import pytest
import torch
import torch.testing

import torchlens_edu.nans
import torchlens_edu.printing  # noqa: F401 - imported here so inner runs add no new modules
from torchlens_edu.pytest_plugin import hook_counts

pytest_plugins = ["pytester"]

# Inner runs skip the cache and the unraisable-exception check: its gc.collect() calls cost
# about a second per run once torch is loaded.
QUICK = ("-p", "no:cacheprovider", "-p", "no:unraisableexception")

def _literal(line: str) -> str:
    """An fnmatch pattern for a line that starts with ``line`` (``[`` is not a class)."""
    return line.replace("[", "[[]") + "*"


PLAIN_TESTS = """
def test_one():
    assert 1 + 1 == 2

def test_two():
    assert [1, 2] == [1, 3]
"""


class _KeepTorchModules(_pytester.SysModulesSnapshot):
    def __init__(self, preserve=None) -> None:
        super().__init__(preserve=lambda name: name.split(".")[0] == "torch"
                         or (preserve is not None and preserve(name)))


@pytest.fixture(scope="module", autouse=True)
def _torch_modules_stay_imported():
    """pytester forgets the modules a test imported. A torch module imported afresh registers
    its operators twice and breaks every later test in this process, so torch's modules stay."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_pytester, "SysModulesSnapshot", _KeepTorchModules)
        yield


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Run pytest in-process on the files written to ``pytester``, with our plugin loaded.

    Other installed plugins stay out: each inner run would import them afresh (hypothesis alone
    is 200+ modules to assertion-rewrite), and they have nothing to do with ours.
    """
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")

    def runner(*args: str, plugin: bool = True) -> pytest.RunResult:
        load = ["-p", "torchlens_edu.pytest_plugin"] if plugin else []
        return pytester.runpytest_inprocess(*QUICK, *load, *args)

    return runner


def test_registered_through_the_entry_point(request: pytest.FixtureRequest) -> None:
    import os

    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        pytest.skip("plugin autoloading is switched off in this run")
    plugin = request.config.pluginmanager.get_plugin("torchlens_edu")
    assert plugin is sys.modules["torchlens_edu.pytest_plugin"]


def test_import_is_light() -> None:
    code = ("import sys, torchlens_edu.pytest_plugin; "
            "assert 'torch' not in sys.modules, 'the plugin imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loading_it_after_an_import_adds_no_rewrite_warning(tmp_path) -> None:
    """Imported before pytest could rewrite it (a conftest, an editable install or PYTHONPATH,
    the entry point), then named with ``-p``: the run's output stays the user's own."""
    import os

    import torchlens_edu

    (tmp_path / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    code = ("import sys, pytest, torchlens_edu.pytest_plugin; "
            "sys.exit(pytest.main(['-p', 'torchlens_edu.pytest_plugin', *sys.argv[1:]]))")
    home = os.path.dirname(os.path.dirname(torchlens_edu.__file__))  # this checkout, explicitly
    env = {**os.environ, "PYTHONPATH": home, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-c", code, *QUICK, "-q", str(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "cannot be rewritten" not in done.stdout + done.stderr
    assert "warning" not in done.stdout.lower()


def test_options_and_markers_are_registered(run) -> None:
    result = run("--help")
    result.stdout.fnmatch_lines(["*--tle-nan-watch*", "*--tle-print=PRESET*"])
    result = run("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.nan_watch*", "@pytest.mark.print_options*"])


def test_off_changes_nothing(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(PLAIN_TESTS + """
import torch

def test_nothing_is_installed():
    from torch.nn.modules import module
    assert not module._global_forward_pre_hooks and not module._global_forward_hooks
    assert torch._tensor_str.PRINT_OPTS.threshold == 1000
""")
    with_plugin = run("-rA")
    without = run("-rA", plugin=False)
    with_plugin.assert_outcomes(passed=2, failed=1)
    without.assert_outcomes(passed=2, failed=1)

    def body(result: pytest.RunResult) -> list[str]:  # without the timing line
        return [line for line in result.outlines if not (" in " in line and "==" in line)]

    assert body(with_plugin) == body(without)


def test_print_preset_option(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile("""
import torch

def test_edu_applies():
    assert torch._tensor_str.PRINT_OPTS.threshold == 30
    assert torch._tensor_str.PRINT_OPTS.edgeitems == 4
""")
    run("--tle-print=edu").assert_outcomes(passed=1)
    assert torch._tensor_str.PRINT_OPTS.threshold == 1000  # restored after the run


def test_print_preset_option_rejects_unknown(run) -> None:
    result = run("--tle-print=nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--tle-print=nope: unknown preset; choose one of edu*"])


def test_print_options_marker(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile("""
import pytest
import torch

opts = torch._tensor_str.PRINT_OPTS

@pytest.mark.print_options("short", precision=3)
def test_marker():
    assert (opts.threshold, opts.precision) == (16, 3)

@pytest.mark.print_options(precision=1)
def test_overrides_on_top_of_the_option():
    assert (opts.threshold, opts.precision) == (30, 1)

def test_after_the_marked_tests():
    assert (opts.threshold, opts.precision) == (30, 4)

@pytest.mark.print_options(precison=1)
def test_typo():
    pass
""")
    result = run("--tle-print=edu")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.print_options: unknown print option 'precison' "
                                 "(did you mean 'precision'?)*"])
    assert "options.py" not in result.stdout.str()  # the message, not our machinery's frames


def test_a_wrong_nan_watch_marker_fails_its_test_saying_what_to_write(
        pytester: pytest.Pytester, run) -> None:
    """Checked before the test runs, so a test that calls no model is not silently unwatched."""
    pytester.makepyfile("""
import pytest

@pytest.mark.nan_watch(mode="bogus")
def test_mode():
    pass

@pytest.mark.nan_watch("warn")
def test_positional():
    pass

@pytest.mark.nan_watch(moed="warn")
def test_typo():
    pass

@pytest.mark.nan_watch(check_inf="yes")
def test_flag():
    pass

@pytest.mark.nan_watch(mode="warn", every=2)
def test_fine():
    pass
""")
    result = run()
    result.assert_outcomes(passed=1, failed=4)
    usage = "mode=..., check_inf=..., every=..., dims=..."
    result.stdout.fnmatch_lines([
        "*_ test_mode _*", "@pytest.mark.nan_watch: mode='bogus': choose 'raise'*",
        "*_ test_positional _*", f"@pytest.mark.nan_watch takes keyword options only ({usage}), "
        "got 'warn': write e.g. mode='warn'",
        "*_ test_typo _*", "@pytest.mark.nan_watch: unknown option 'moed' (did you mean "
        f"'mode'?); the options are {usage}",
        "*_ test_flag _*", "@pytest.mark.nan_watch: watch_nans(check_inf='yes'): give True or "
        "False",
    ])
    assert "During handling" not in result.stdout.str()


NAN_TESTS = """
import pytest
import torch
from torch import nn

class Block(nn.Module):
    def forward(self, x):
        return torch.log(x - 100.0)

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), Block())

MODEL = build()

def test_clean():
    model = nn.Linear(4, 4)
    assert torch.isfinite(model(torch.ones(2, 4))).all()

def test_model_made_inside_the_test():
    build()(torch.ones(2, 4))

@pytest.mark.nan_watch
def test_marked():
    MODEL(torch.ones(2, 4))

@pytest.mark.nan_watch(check_inf=False)
def test_marked_with_options():
    nn.Sequential(nn.ReLU())(torch.full((2, 4), float("inf")))  # Inf is not checked

def test_nothing_is_left_after_the_watched_tests():
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in MODEL.modules())
"""

REPORT_LINES = ["*NonFiniteError: NaN made in forward: log at *", "*module  '1'*",
                "*source  *.py:7 *", "*hint: log/sqrt of <= 0*"]


def test_nan_watch_option(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(NAN_TESTS)
    result = run("--tle-nan-watch", "-k", "not nothing_is_left")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*_ test_model_made_inside_the_test _*",
                                 ">       build()(torch.ones(2, 4))", *REPORT_LINES])
    assert "nans.py" not in result.stdout.str()  # the report, not our machinery's frames
    assert torch.nn.Module.__call__ is torch.nn.Module._wrapped_call_impl


def test_the_short_summary_names_what_was_made_where(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(test_t=NAN_TESTS)
    result = run("--tle-nan-watch", "-rf", "-vv", "-k", "made_inside")  # -vv: lines not cut
    result.stdout.fnmatch_lines(["FAILED test_t.py::test_model_made_inside_the_test - "
                                 "*NonFiniteError: NaN made in forward: log at test_t.py:7 "
                                 "(module '1')"])


def test_nan_watch_marker(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(NAN_TESTS)
    result = run()
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*_ test_marked _*", *REPORT_LINES])


def test_nan_watch_fixture(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(NAN_TESTS + """
def test_fixture(nan_watch):
    watch = nan_watch(MODEL, mode="warn")
    MODEL(torch.ones(2, 4))
    assert [r.op for r in watch.reports] == ["log"]

def test_fixture_raises(nan_watch):
    nan_watch(MODEL)
    MODEL(torch.ones(2, 4))
""")
    result = run("-k", "test_fixture or test_nothing_is_left")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*_ test_fixture_raises _*", *REPORT_LINES])


def test_tle_inspect_fixture(pytester: pytest.Pytester, run) -> None:
    import torchlens_edu.inspector  # noqa: F401 - before the inner run, which would re-import it
    pytester.makepyfile("""
import torch
from torch import nn

def test_clean(tle_inspect):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    insp = tle_inspect(model)
    with insp.hooks() as h:
        h.forward("0", lambda *args: None)
        model(torch.ones(1, 2))

def test_leaks(tle_inspect):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    tle_inspect(model)
    model[0].register_forward_hook(lambda *args: None)

def test_not_a_module(tle_inspect):
    tle_inspect({"weight": torch.ones(2)})
""")
    result = run()
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*",
                                 "*hooks left behind on the inspected model(s):",
                                 "  module '0' forward_hooks: +1"])


def test_hook_counts_sees_module_tensor_and_global_hooks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    handles = [model[0].register_forward_pre_hook(lambda *a: None),
               model[0].weight.register_hook(lambda g: g),
               torch.nn.modules.module.register_module_forward_hook(lambda *a: None)]
    try:
        assert hook_counts(model) == {"module '0' forward_pre_hooks": 1,
                                      "parameter 0.weight tensor hooks": 1,
                                      "module global_forward_hooks": 1}
    finally:
        for handle in handles:
            handle.remove()
    assert hook_counts(model) == {}


TENSOR_FAILURES = """
import torch

def test_scalar():
    assert torch.tensor(1.5) == 2.0

def test_many():
    a = torch.arange(100.0).reshape(10, 10)
    b = a.clone()
    b[3, 4] += 1
    b[7, 1] -= 0.5
    assert a.sum() == b.sum()

def test_close():
    a = torch.arange(100.0).reshape(10, 10)
    b = a.clone()
    b[3, 4] += 1
    b[7, 1] -= 0.5
    torch.testing.assert_close(a, b)

def test_close_nested():
    a = torch.arange(10.0)
    torch.testing.assert_close({"x": [a, a]}, {"x": [a, a * 2]})

def test_elementwise():
    a = torch.arange(100.0)
    assert a == a + 1
"""


def test_tensor_failure_text(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(TENSOR_FAILURES)
    result = run()
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines([_literal(line) for line in [
        "E       assert tensor(1.5000) == 2.0",
        "E         left:  Tensor[] f32 cpu =1.5 NaN:0",
        "E         right: 2.0",
        "E         differ by 0.5 (relative 0.25)",
        "E       assert tensor(4950.) == tensor(4950.5000)",
        "E         differ by 0.5 (relative 0.000101)",
        "E       Greatest absolute difference: 1.0 at index (3, 4) (up to 1e-05 allowed)",
        "E       (torchlens_edu)",
        "E       actual:   Tensor[10, 10] f32 cpu n=100 (400 B) μ=49.5 σ=29.01",
        "E       expected: Tensor[10, 10] f32 cpu n=100 (400 B) μ=49.51 σ=29",
        "E       first mismatch at index [3, 4]: 34 vs 35",
        "E       The failure occurred for item ['x'][1]",
        "E       expected: Tensor[10] f32 cpu n=10 (40 B) μ=9",
        "E       first mismatch at index [1]: 1 vs 2",
        "E       (torchlens_edu) `assert a == b` on tensors asks for one bool from an elementwise "
        "result: use torch.testing.assert_close(a, b) or torch.equal(a, b)",
    ]])
    assert "tensor([[" not in result.stdout.str()  # no walls of numbers


NESTED_AND_EQUAL = """
import torch

def test_all():
    a, b = torch.tensor([1, 2]), torch.tensor([1, 3])
    assert (a == b).all()

class Out:
    logits = torch.zeros(2, 3)

def test_equal():
    out, expected = Out(), [torch.zeros(2, 3)]
    expected[0][1, 2] = 0.5
    assert torch.equal(out.logits, expected[0])

def test_equal_shapes():
    assert torch.equal(torch.zeros(2, 3), torch.zeros(3, 2))
"""


def test_nested_comparison_and_torch_equal(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(NESTED_AND_EQUAL)
    result = run()
    result.assert_outcomes(failed=3)
    out = result.stdout.str()
    # pytest writes `.all` after the explanation's last line: that line reads well with it
    result.stdout.fnmatch_lines([_literal(line) for line in [
        "E             max rel diff: 0.333333 at index [1]",
        "E             in (tensor([1, 2]) == tensor([1, 3])).all",
        "E       (torchlens_edu) torch.equal(out.logits, expected[0]) is False",
        "E       left:  Tensor[2, 3] f32 cpu n=6 (24 B) all zeros",
        "E       first mismatch at index [1, 2]: 0 vs 0.5",
    ]])
    assert "[1].all" not in out
    assert "torch.equal(...) is False" not in out  # calls in the arguments are not run again


def test_tensor_failure_text_can_be_switched_off(pytester: pytest.Pytester, run) -> None:
    pytester.makepyfile(TENSOR_FAILURES)
    result = run("-o", "tle_tensor_diffs=false")
    result.assert_outcomes(failed=5)
    assert "torchlens_edu" not in result.stdout.str()
    assert "left:  Tensor" not in result.stdout.str()


@pytest.mark.parametrize(("left", "right", "expected"), [
    (torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3]),
     ["mismatched elements: 1 / 3 (33.3%)", "first mismatch at index [1]: 2 vs 5",
      "max abs diff: 3 at index [1]", "max rel diff: 0.6 at index [1]"]),
    (torch.tensor([True, False]), torch.tensor([True, True]),
     ["mismatched elements: 1 / 2 (50.0%)", "first mismatch at index [1]: False vs True"]),
    (torch.zeros(2, 3), torch.zeros(3, 2), ["shapes differ: (2, 3) vs (3, 2)"]),
    (torch.tensor([0.0, float("nan")]), torch.tensor([0.0, float("nan")]),
     ["mismatched elements: 1 / 2 (50.0%)", "first mismatch at index [1]: nan vs nan",
      "max abs diff: nan at index [1]", "max rel diff: nan at index [1]"]),
    (torch.ones(2, device="meta"), torch.zeros(2, device="meta"), []),
    (torch.ones(2), "not a tensor", []),
])
def test_where_they_differ(left, right, expected) -> None:
    from torchlens_edu.pytest_plugin import _where_they_differ

    assert _where_they_differ(left, right, rtol=0.0, atol=0.0, equal_nan=False) == expected

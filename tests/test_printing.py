"""Print options that always come back, and a reversible repr patch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchlens_edu as tle
from support.threads import in_threads
from torchlens_edu.printing import options as printing


def _opts() -> dict:
    return printing.get_printoptions()


def test_set_printoptions_returns_previous_and_keeps_sci_mode() -> None:
    before = _opts()
    try:
        torch.set_printoptions(sci_mode=True)
        old = tle.set_printoptions("edu")
        assert old["sci_mode"] is True
        now = _opts()
        assert (now["precision"], now["edgeitems"], now["threshold"]) == (4, 4, 30)
        assert now["sci_mode"] is False  # the preset sets it, whatever was there
        assert 80 <= now["linewidth"] <= 160
        torch.set_printoptions(sci_mode=True)
        tle.set_printoptions(precision=2)
        assert _opts()["threshold"] == 30  # options not named stay as they are
        assert _opts()["sci_mode"] is True  # torch.set_printoptions would have reset it to None
    finally:
        tle.set_printoptions(**before)
    assert _opts() == before


@pytest.mark.parametrize("preset", list(printing.PRESETS))
def test_every_preset_sets_every_option_whatever_was_set_before(preset: str) -> None:
    seen = []
    for sci_mode in (True, False, None):
        with tle.printoptions(precision=7, edgeitems=1, threshold=5, linewidth=200,
                              sci_mode=sci_mode), tle.printoptions(preset) as applied:
            seen.append(applied)
    assert seen[0] == seen[1] == seen[2]
    assert set(printing.PRESETS[preset]) == set(_opts())


def test_edu_prints_attention_weights_in_fixed_point() -> None:
    # values spanning 1e-5 .. 0.65: torch's automatic notation prints 6.4804e-01
    att = torch.tensor([[1.0, 0.0], [0.6480, 0.3520], [0.5, 1e-5]])
    with tle.printoptions("default"):
        assert "6.4800e-01" in str(att)
    with tle.printoptions("edu"):
        assert "0.6480" in str(att) and "e-" not in str(att)


def test_the_readme_documents_every_field_of_every_preset() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for preset, options in printing.PRESETS.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{preset}` |")),
                   None)
        assert row is not None, f"README.md has no row for the {preset!r} preset"
        with tle.printoptions(preset) as applied:
            for name in options:
                value = applied[name]
                shown = "terminal" if name == "linewidth" and callable(options[name]) else (
                    "inf" if value == math.inf else str(value))
                assert f"{name}={shown}" in row, (preset, name, row)


@pytest.mark.parametrize("preset", list(printing.PRESETS))
def test_every_preset_restores_exactly(preset: str) -> None:
    before = _opts()
    with tle.printoptions(preset) as applied:
        assert applied == _opts()
    assert _opts() == before


def test_default_preset_is_torchs_default_profile() -> None:
    with tle.printoptions("full"), tle.printoptions("default"):
        ours = _opts()
        torch.set_printoptions(profile="default")
        assert _opts() == ours


def test_printoptions_restores_after_exception_and_nesting() -> None:
    before = _opts()
    with pytest.raises(ZeroDivisionError), tle.printoptions("edu", sci_mode=True):
        with tle.printoptions(precision=1, threshold=math.inf):
            assert _opts()["precision"] == 1 and _opts()["sci_mode"] is True
            with tle.printoptions("short"):
                1 / 0  # noqa: B018
        assert _opts()["precision"] == 4 and _opts()["threshold"] == 30
    assert _opts() == before


def test_printoptions_changes_what_torch_prints() -> None:
    with tle.printoptions(precision=2):
        assert repr(torch.tensor([1.23456])) == "tensor([1.23])"
    with tle.printoptions("edu"):
        assert "..." in repr(torch.arange(31))


def test_bad_options_say_what_to_do() -> None:
    before = _opts()
    with pytest.raises(ValueError, match="choose one of 'edu'"):
        tle.set_printoptions("pretty")
    with pytest.raises(TypeError, match="did you mean 'precision'"):
        tle.set_printoptions(precission=3)
    with pytest.raises(TypeError), tle.printoptions(edge_items=3):
        pass
    # torch's first positional argument is precision; ours is the preset: say so
    with pytest.raises(TypeError) as info:
        tle.set_printoptions(4)  # type: ignore[arg-type]
    assert str(info.value) == ("a print preset is a name ('edu', 'short', 'full', 'default') or "
                               "None, not int 4; for 4 digits after the decimal point pass "
                               "precision=4")
    # a value the user gives is taken as it is, never called (only a preset's may be computed)
    calls: list[int] = []
    with pytest.raises(ValueError, match=r"print option precision=.*: give an int >= 0"):
        tle.set_printoptions(precision=lambda: calls.append(1) or 4)
    with pytest.raises(ValueError, match=r"print option linewidth=Linear\(.*\): give an int >= 1"
                       ), tle.printoptions(linewidth=torch.nn.Linear(2, 2)):
        pass
    assert not calls
    assert _opts() == before


@pytest.mark.slow
def test_env_switch_applies_preset_on_import() -> None:
    code = ("import torch, torchlens_edu; o = torch._tensor_str.PRINT_OPTS; "
            "print(o.precision, o.edgeitems, o.threshold)")
    env = {**os.environ, "TORCHLENS_EDU_PRINT": "edu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["4", "4", "30"]
    env["TORCHLENS_EDU_PRINT"] = "nope"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "3", "1000"] and "unknown print preset" in out.stderr


def test_install_uninstall_restore_repr_exactly() -> None:
    original = torch.Tensor.__repr__
    original_dict_entry = torch.Tensor.__dict__["__repr__"]
    tle.install()
    try:
        tle.install()  # twice: harmless
        text = repr(torch.zeros(2, 3))
        assert text.splitlines()[0].startswith("Tensor[2, 3] f32 cpu")
        assert text.splitlines()[1].startswith("tensor([[0., 0., 0.]")
        assert "requires_grad=True" in repr(torch.ones(1, requires_grad=True))
    finally:
        tle.uninstall()
    assert torch.Tensor.__repr__ is original
    assert torch.Tensor.__dict__["__repr__"] is original_dict_entry
    tle.uninstall()  # not installed: nothing happens
    assert torch.Tensor.__repr__ is original


def test_installed_context_restores_on_exception_and_nesting() -> None:
    original = torch.Tensor.__repr__
    with pytest.raises(KeyError), tle.installed():
        with tle.installed():
            pass
        assert "f32" in repr(torch.ones(1))  # the inner block left the outer one's patch
        raise KeyError
    assert torch.Tensor.__repr__ is original


def test_uninstall_refuses_to_clobber_a_later_patch() -> None:
    original = torch.Tensor.__repr__
    tle.install()
    try:
        torch.Tensor.__repr__ = lambda self, **kw: "theirs"  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="replaced again"):
            tle.uninstall()
    finally:
        torch.Tensor.__repr__ = printing._summary_repr  # type: ignore[method-assign]
        tle.uninstall()
    assert torch.Tensor.__repr__ is original


def test_printoptions_from_threads_restore_the_options_when_the_last_block_leaves() -> None:
    """Issue 16.4: overlapping blocks from 4 threads left threshold=inf, precision=3 behind."""
    before = _opts()

    def work(i: int) -> None:
        for j in range(300):
            with tle.printoptions("full" if i % 2 else "short", precision=i + j % 3):
                assert repr(torch.ones(2)).startswith("tensor([1.")

    assert in_threads(work, switch_interval=1e-6) == []
    assert _opts() == before


def test_installed_from_threads_never_breaks_repr() -> None:
    """Issue 16.4: installed() from 4 threads made repr raise "'NoneType' object is not
    callable" and could leave the summary repr installed."""
    original = torch.Tensor.__repr__

    def work(i: int) -> None:
        for _ in range(200):
            with tle.installed():
                assert repr(torch.ones(2)).startswith("Tensor[2] f32")

    assert in_threads(work, switch_interval=1e-6) == []
    assert torch.Tensor.__repr__ is original


@pytest.mark.parametrize(("option", "value", "hint"), [
    ("precision", -3, "an int >= 0"), ("precision", 2.5, "an int >= 0"),
    ("edgeitems", -1, "an int >= 0"), ("linewidth", 0, "an int >= 1"),
    ("threshold", math.nan, "a number >= 0"), ("threshold", "all", "a number >= 0"),
    ("sci_mode", "yes", "True, False or None"),
])
def test_print_options_torch_would_fail_on_later_are_refused(option: str, value: object,
                                                              hint: str) -> None:
    """Issue 16.14: precision=-3 was accepted, and then every float repr raised."""
    before = _opts()
    with pytest.raises(ValueError, match=f"print option {option}={value!r}: give {hint}"):
        tle.set_printoptions(**{option: value})
    with pytest.raises(ValueError, match=f"print option {option}="), \
            tle.printoptions(**{option: value}):
        pass
    assert _opts() == before
    assert repr(torch.tensor([1.5])) == "tensor([1.5000])"

"""The pydevd plugin acts only in debug sessions that asked for torchlens_edu.

pydevd loads every ``pydevd_plugins/extensions/pydevd_plugin*.py`` of the environment in every
debug session, so a program that never imports torchlens_edu must see tensors exactly as pydevd
shows them without the plugin, and must not get torchlens_edu imported behind its back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).parents[1] / "pydevd_plugins" / "extensions" / \
    "pydevd_plugin_torchlens_edu.py"

# Runs in a fresh interpreter: this test process has imported torchlens_edu already.
_PROBE = f"""
import importlib.util, sys
import torch
from debugpy._vendored import vendored

with vendored("pydevd"):
    spec = importlib.util.spec_from_file_location("tle_pydevd_plugin", {str(PLUGIN)!r})
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    from _pydevd_bundle.pydevd_resolver import defaultResolver

summary, children = plugin.TensorSummary(), plugin.TensorChildren()
t = torch.zeros(2, 3)

def report(label):
    print(label, "str:", summary.get_str(t))
    print(label, "hover:", summary.get_str_in_context(t, "hover"))
    print(label, "repl:", summary.get_str_in_context(t, "repl") is not None)
    default = sorted(defaultResolver.get_dictionary(t)) == sorted(children.get_dictionary(t))
    print(label, "children are pydevd's own:", default)
    print(label, "imported:", "torchlens_edu" in sys.modules)

assert summary.can_provide(torch.Tensor, "Tensor")  # decided per call, not per cached type
report("before")
if sys.argv[1:] == ["import"]:
    import torchlens_edu
    report("after")
"""


def _probe(*args: str, env_print: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCHLENS_EDU_PRINT"}
    if env_print is not None:
        env["TORCHLENS_EDU_PRINT"] = env_print
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_plugin_is_inert_in_a_program_that_never_imports_torchlens_edu():
    out = _probe("import")
    assert "before str: None" in out and "before hover: None" in out
    assert "before repl: False" in out
    assert "before children are pydevd's own: True" in out
    assert "before imported: False" in out  # the plugin imported nothing
    # the same type, once the program imports torchlens_edu: the summary from then on
    assert "after str: Tensor[2, 3] f32" in out and "after hover: Tensor[2, 3] f32" in out
    assert "after repl: True" in out
    assert "after children are pydevd's own: False" in out


@pytest.mark.slow
def test_plugin_acts_when_a_launch_configuration_asks_for_it():
    out = _probe(env_print="edu")
    assert "before str: Tensor[2, 3] f32" in out
    assert "before children are pydevd's own: False" in out


def test_every_shipped_launch_configuration_asks_for_the_plugin():
    """Launch configurations either run torchlens_edu itself or set TORCHLENS_EDU_PRINT."""
    from torchlens_edu._core import jsonc
    from torchlens_edu.commands.vscode import template

    for config in jsonc.parse(template("launch.json")).plain()["configurations"]:
        if config["request"] == "launch":
            assert config["env"].get("TORCHLENS_EDU_PRINT"), config["name"]

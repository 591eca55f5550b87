"""Every docstring example in the package runs and says what it shows; every public function
and class has one (the README's promise: a runnable example next to each docstring)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest
import torch

import torchlens_edu


def _modules() -> list[str]:
    """Every module of the package once (a shim that is the same module object counts once)."""
    seen: set[int] = set()
    names = []
    for info in pkgutil.walk_packages(torchlens_edu.__path__, "torchlens_edu."):
        module = importlib.import_module(info.name)
        if id(module) not in seen:
            seen.add(id(module))
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch}, report=False,
                             optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (above)"


# the public namespaces: the front door, the bundled models, and each subpackage's own front door
PUBLIC = ["torchlens_edu", "torchlens_edu.models", "torchlens_edu.printing",
          "torchlens_edu.shapes", "torchlens_edu.nans"]


def _public_objects() -> list[tuple[str, object]]:
    found = []
    for name in PUBLIC:
        module: ModuleType = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found.append((f"{name}.{attr}", obj))
    return found


@pytest.mark.parametrize(("name", "obj"), _public_objects(), ids=lambda x: x if isinstance(
    x, str) else "")
def test_public_functions_and_classes_have_an_example(name: str, obj: object) -> None:
    assert ">>>" in (inspect.getdoc(obj) or ""), f"{name} has no runnable example"

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


def _public_objects() -> dict[str, object]:
    """Every public function and class, and the public methods and properties of the classes
    (the op recorder's callbacks on ShapeTracer are its protocol with ops.py, not for users)."""
    found: dict[str, object] = {}
    for name in PUBLIC:
        module: ModuleType = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            found.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
            for member, value in vars(obj).items() if inspect.isclass(obj) else ():
                value = value.fget if isinstance(value, property) else value
                value = getattr(value, "__func__", value)  # classmethod / staticmethod
                if member.startswith("_") or member in _RECORDER_CALLBACKS:
                    continue
                if inspect.isfunction(value):
                    found.setdefault(f"{obj.__module__}.{obj.__qualname__}.{member}", value)
    return found


_RECORDER_CALLBACKS = {"records_ops", "op_done", "op_failed"}
_PUBLIC_OBJECTS = _public_objects()


@pytest.mark.parametrize("name", sorted(_PUBLIC_OBJECTS))
def test_public_functions_and_classes_have_an_example(name: str) -> None:
    doc = inspect.getdoc(_PUBLIC_OBJECTS[name]) or ""
    assert ">>>" in doc, f"{name} has no runnable example"

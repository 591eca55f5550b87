"""How tensors look in VS Code's Variables pane (and any pydevd-based debugger).

pydevd loads every ``pydevd_plugins/extensions/pydevd_plugin*.py`` module it finds on the path
(``pydevd_plugins`` is a namespace package shared with debugpy's own plugins). This one shows a
tensor as torchlens_edu's one-line summary, metadata only, so that opening the pane never reads
the data (no CUDA sync, nothing slow on a big tensor):

    Tensor[1, 12, 9, 64] f32 cuda:0 n=6912 (27 KiB)

and expands it into ``shape``, ``dtype``, ``device``, ``requires_grad``, ``grad``,
``grad_fn``, ``is_leaf`` (plus ``stats`` for CPU tensors: the numbers, read on demand).
The Debug Console prints the values themselves, with the current print options.

pydevd loads this file in every debug session of the environment, so it acts only where
torchlens_edu was asked for: the program imported ``torchlens_edu``, or a shipped launch
configuration set ``TORCHLENS_EDU_PRINT`` (all of ours that launch a program do). Anywhere else
tensors show as pydevd shows them by default, and torchlens_edu is never imported. The check
runs on every call, not once per type (pydevd caches a type's provider): a program that imports
torchlens_edu after its first tensor was shown gets the summary from then on.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from _pydevd_bundle.pydevd_extension_api import StrPresentationProvider, TypeResolveProvider
from _pydevd_bundle.pydevd_resolver import defaultResolver

__all__ = ["TensorChildren", "TensorSummary"]

_FIELDS = ("shape", "dtype", "device", "requires_grad", "grad", "grad_fn", "is_leaf")


def _asked_for() -> bool:
    """Whether this debug session wants torchlens_edu's views (see the module docstring)."""
    return "torchlens_edu" in sys.modules or bool(os.environ.get("TORCHLENS_EDU_PRINT", "").strip())


def _is_tensor_type(type_object: type) -> bool:
    torch = sys.modules.get("torch")  # a process that never imported torch has no tensors
    return torch is not None and isinstance(type_object, type) and issubclass(
        type_object, torch.Tensor)


class TensorSummary(StrPresentationProvider):
    """The value column (and hovers, watches): ``describe(t, stats=False)``. The Debug Console
    and "Copy Value" get torch's own printout: there the learner asked for the numbers."""

    def can_provide(self, type_object: type, type_name: str) -> bool:
        return _is_tensor_type(type_object)

    def get_str_in_context(self, val: Any, context: str) -> str | None:
        if context in ("repl", "clipboard"):
            return repr(val) if _asked_for() else None
        return self.get_str(val)

    def get_str(self, val: Any) -> str | None:
        if not _asked_for():
            return None  # pydevd then shows the value as it would without this plugin
        from torchlens_edu.printing import describe

        return describe(val, stats=False)


class TensorChildren(TypeResolveProvider):
    """What expanding a tensor shows: its metadata, its gradient, and (CPU) its statistics."""

    def can_provide(self, type_object: type, type_name: str) -> bool:
        return _is_tensor_type(type_object)

    def get_dictionary(self, var: Any) -> dict[str, Any]:
        if not _asked_for():
            return defaultResolver.get_dictionary(var)  # pydevd's own view of an object
        children = {name: getattr(var, name) for name in _FIELDS}
        if var.device.type == "cpu" and var.layout == sys.modules["torch"].strided:
            from torchlens_edu.printing import tensor_stats

            children["stats"] = tensor_stats(var)  # computed when expanded, never on CUDA
        return children

    def resolve(self, var: Any, attribute: str) -> Any:
        if not _asked_for():
            return defaultResolver.resolve(var, attribute)
        if attribute == "stats":
            from torchlens_edu.printing import tensor_stats

            return tensor_stats(var)
        return getattr(var, attribute)

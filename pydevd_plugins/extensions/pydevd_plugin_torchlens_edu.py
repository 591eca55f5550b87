"""How tensors look in VS Code's Variables pane (and any pydevd-based debugger).

pydevd loads every ``pydevd_plugins/extensions/pydevd_plugin*.py`` module it finds on the path
(``pydevd_plugins`` is a namespace package shared with debugpy's own plugins). This one shows a
tensor as torchlens_edu's one-line summary, metadata only, so that opening the pane never reads
the data (no CUDA sync, nothing slow on a big tensor):

    Tensor[1, 12, 9, 64] f32 cuda:0 n=6912 (27 KiB)

and expands it into ``shape``, ``dtype``, ``device``, ``requires_grad``, ``grad``,
``grad_fn``, ``is_leaf`` (plus ``stats`` for CPU tensors: the numbers, read on demand).
The Debug Console prints the values themselves, with the current print options.
"""

from __future__ import annotations

import sys
from typing import Any

from _pydevd_bundle.pydevd_extension_api import StrPresentationProvider, TypeResolveProvider

__all__ = ["TensorChildren", "TensorSummary"]

_FIELDS = ("shape", "dtype", "device", "requires_grad", "grad", "grad_fn", "is_leaf")


def _is_tensor_type(type_object: type) -> bool:
    torch = sys.modules.get("torch")  # a process that never imported torch has no tensors
    return torch is not None and isinstance(type_object, type) and issubclass(
        type_object, torch.Tensor)


class TensorSummary(StrPresentationProvider):
    """The value column (and hovers, watches): ``describe(t, stats=False)``. The Debug Console
    and "Copy Value" get torch's own printout: there the learner asked for the numbers."""

    def can_provide(self, type_object: type, type_name: str) -> bool:
        return _is_tensor_type(type_object)

    def get_str_in_context(self, val: Any, context: str) -> str:
        if context in ("repl", "clipboard"):
            return repr(val)
        return self.get_str(val)

    def get_str(self, val: Any) -> str:
        from torchlens_edu.printing import describe

        return describe(val, stats=False)


class TensorChildren(TypeResolveProvider):
    """What expanding a tensor shows: its metadata, its gradient, and (CPU) its statistics."""

    def can_provide(self, type_object: type, type_name: str) -> bool:
        return _is_tensor_type(type_object)

    def get_dictionary(self, var: Any) -> dict[str, Any]:
        children = {name: getattr(var, name) for name in _FIELDS}
        if var.device.type == "cpu" and var.layout == sys.modules["torch"].strided:
            from torchlens_edu.printing import tensor_stats

            children["stats"] = tensor_stats(var)  # computed when expanded, never on CUDA
        return children

    def resolve(self, var: Any, attribute: str) -> Any:
        if attribute == "stats":
            from torchlens_edu.printing import tensor_stats

            return tensor_stats(var)
        return getattr(var, attribute)

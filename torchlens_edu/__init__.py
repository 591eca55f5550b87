"""torchlens_edu: see inside transformers while you learn them.

>>> import torchlens_edu as tle
>>> tle.describe(torch.zeros(2, 3))  # doctest: +SKIP

Names are imported lazily so that ``import torchlens_edu`` (and the pytest plugin) stay cheap.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # printing
    "set_printoptions": "printing",
    "printoptions": "printing",
    "describe": "printing",
    "tensor_stats": "printing",
    "TensorStats": "printing",
    "show": "printing",
    "show_attention": "printing",
    "install": "printing",
    "uninstall": "printing",
    "installed": "printing",
    # named dimensions and shape assertions
    "Dims": "dims",
    "format_shape": "dims",
    "assert_shape": "asserts",
    "shape_scope": "asserts",
    "ShapeError": "asserts",
    # hooks and capture
    "hooks": "hookset",
    "HookSet": "hookset",
    "HookCall": "hookset",
    "ActivationCache": "capture",
    "CaptureTooLarge": "capture",
    # shapes
    "trace_shapes": "shapes",
    "ShapeTrace": "shapes",
    "ShapeTracer": "shapes",
    # NaN / Inf
    "watch_nans": "nans",
    "NonFiniteError": "nans",
    "NonFiniteReport": "nans",
    "replaying": "_core.replay_state",
    # where two models differ
    "compare": "divergence",
    "copy_weights": "divergence",
    "Comparison": "divergence",
    # facade
    "inspect": "inspector",
    "Inspector": "inspector",
    # debugging
    "stop_at": "debug",
    "clear_stops": "debug",
    "stop_at_module": "debug",
}
_SUBMODULES = ("debug",)  # tle.debug.listen(...) works without importing it first

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from torchlens_edu import debug
    from torchlens_edu._core.replay_state import replaying
    from torchlens_edu.asserts import ShapeError, assert_shape, shape_scope
    from torchlens_edu.capture import ActivationCache, CaptureTooLarge
    from torchlens_edu.debug import clear_stops, stop_at, stop_at_module
    from torchlens_edu.dims import Dims, format_shape
    from torchlens_edu.divergence import Comparison, compare, copy_weights
    from torchlens_edu.hookset import HookCall, HookSet, hooks
    from torchlens_edu.inspector import Inspector, inspect
    from torchlens_edu.nans.watch import NonFiniteError, NonFiniteReport, watch_nans
    from torchlens_edu.printing import (
        TensorStats,
        describe,
        install,
        installed,
        printoptions,
        set_printoptions,
        show,
        show_attention,
        tensor_stats,
        uninstall,
    )
    from torchlens_edu.shapes import ShapeTrace, ShapeTracer, trace_shapes


if os.environ.get("TORCHLENS_EDU_PRINT"):  # e.g. from a VS Code launch config: apply the preset
    from torchlens_edu.printing.options import apply_env_preset

    apply_env_preset()

if os.environ.get("TORCHLENS_EDU_STOP"):  # a stop point asked for by environment: switch it on
    importlib.import_module("torchlens_edu.debug").read_env()


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"torchlens_edu.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchlens_edu' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"torchlens_edu.{module}"), name)
    globals()[name] = value  # next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext torchlens_edu``: registers ``%trace_shapes``."""
    from torchlens_edu.integrations.ipython import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext torchlens_edu``: removes what ``%load_ext`` added."""
    from torchlens_edu.integrations.ipython import unload_ipython_extension as unload

    unload(ipython)

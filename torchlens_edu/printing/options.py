"""Print options that learners can read, and that always come back as they were.

``torch.set_printoptions`` has two traps: it resets ``sci_mode`` whenever you do not pass it,
and a ``profile`` silently resets every option you do not pass. Here every change starts from
the *current* state (read from ``torch._tensor_str.PRINT_OPTS``), returns what was there before,
and ``printoptions(...)`` puts back that exact state on exit, also on exceptions and nested.

``install()`` makes ``repr(tensor)`` start with ``describe``'s summary line, reversibly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from torchlens_edu._core.formatting import did_you_mean
from torchlens_edu.printing.summary_line import describe

__all__ = [
    "PRESETS",
    "apply_env_preset",
    "get_printoptions",
    "install",
    "installed",
    "printoptions",
    "set_printoptions",
    "uninstall",
]

ENV_VAR = "TORCHLENS_EDU_PRINT"


def _terminal_width() -> int:
    # never narrower than torch's default nor wider than a comfortable reading width
    return max(80, min(shutil.get_terminal_size((100, 24)).columns, 160))


# name -> options (callables are evaluated when the preset is applied: the terminal can change)
PRESETS: dict[str, dict[str, Any]] = {
    # few values per axis, summarised early: the shape of the data, not a wall of numbers
    "edu": {"precision": 4, "edgeitems": 4, "threshold": 30, "linewidth": _terminal_width},
    "short": {"precision": 2, "edgeitems": 2, "threshold": 16, "linewidth": _terminal_width},
    "full": {"precision": 4, "edgeitems": 3, "threshold": math.inf,
             "linewidth": _terminal_width},
    # torch's own defaults (its "default" profile)
    "default": {"precision": 4, "edgeitems": 3, "threshold": 1000, "linewidth": 80,
                "sci_mode": None},
}


def get_printoptions() -> dict[str, Any]:
    """The current torch print options, every field (``sci_mode`` included).

    >>> sorted(get_printoptions())
    ['edgeitems', 'linewidth', 'precision', 'sci_mode', 'threshold']
    """
    opts = torch._tensor_str.PRINT_OPTS
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def _restore(options: dict[str, Any]) -> None:
    opts = torch._tensor_str.PRINT_OPTS
    for name, value in options.items():
        setattr(opts, name, value)


def _resolve(preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    fields = set(get_printoptions())
    for name in overrides:
        if name not in fields:
            hint = did_you_mean(name, fields)
            hint = f" ({hint})" if hint else ""
            raise TypeError(f"unknown print option {name!r}{hint}; "
                            f"choose from {', '.join(sorted(fields))}")
    if preset is not None and preset not in PRESETS:
        hint = did_you_mean(preset, PRESETS)
        hint = f" ({hint})" if hint else ""
        raise ValueError(f"unknown print preset {preset!r}{hint}; choose one of "
                         f"{', '.join(map(repr, PRESETS))}, or None to keep the current options")
    chosen = dict(PRESETS[preset]) if preset is not None else {}
    chosen.update(overrides)
    return {k: (v() if callable(v) else v) for k, v in chosen.items()}


def set_printoptions(preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Apply a preset (``"edu"``, ``"short"``, ``"full"``, ``"default"``) and/or single options.

    Options you do not name keep their current value (``sci_mode`` too, unlike
    ``torch.set_printoptions``). Returns the previous options: ``set_printoptions(**old)``
    restores them exactly.

    >>> old = set_printoptions("edu", precision=2)
    >>> torch._tensor_str.PRINT_OPTS.threshold
    30
    >>> _ = set_printoptions(**old)
    """
    chosen = _resolve(preset, overrides)
    previous = get_printoptions()
    _restore(chosen)
    return previous


@contextlib.contextmanager
def printoptions(preset: str | None = None, **overrides: Any) -> Iterator[dict[str, Any]]:
    """``with printoptions("edu"):`` ... then the exact previous options, whatever happened.

    >>> with printoptions(precision=2):
    ...     print(torch.tensor([1.23456]))
    tensor([1.23])
    """
    previous = set_printoptions(preset, **overrides)
    try:
        yield get_printoptions()
    finally:
        _restore(previous)


def apply_env_preset() -> None:
    """Apply ``$TORCHLENS_EDU_PRINT`` (a preset name), as ``import torchlens_edu`` does.

    A wrong name warns instead of breaking the import (e.g. inside a VS Code launch config).
    """
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return
    try:
        set_printoptions(name)
    except ValueError as err:
        warnings.warn(f"${ENV_VAR}: {err}", stacklevel=2)


# --- repr patching -----------------------------------------------------------------------------

_original_repr: Any = None  # torch.Tensor.__repr__ as found by install(); None when not installed


def _summary_repr(self: torch.Tensor, /, *, tensor_contents: Any = None) -> str:
    return describe(self) + "\n" + _original_repr(self, tensor_contents=tensor_contents)


def install() -> None:
    """Make ``repr(tensor)`` start with ``describe``'s line (like lovely-tensors' monkey_patch).

    Undo with ``uninstall()``; calling ``install()`` twice is harmless.

    >>> install()
    >>> print(repr(torch.zeros(2)).splitlines()[0])
    Tensor[2] f32 cpu n=2 (8 B) all zeros NaN:0
    >>> uninstall()
    """
    global _original_repr
    if _original_repr is not None:
        return
    _original_repr = torch.Tensor.__dict__["__repr__"]
    # a patch by design (undone by uninstall); torch leaves its __repr__ unannotated
    torch.Tensor.__repr__ = _summary_repr  # type: ignore[method-assign, assignment]


def uninstall() -> None:
    """Put back the exact ``torch.Tensor.__repr__`` that ``install()`` found.

    >>> uninstall()  # not installed: nothing to do
    """
    global _original_repr
    if _original_repr is None:
        return
    if torch.Tensor.__dict__.get("__repr__") is not _summary_repr:
        raise RuntimeError("torch.Tensor.__repr__ was replaced again after tle.install() "
                           "(another tool patched it); undo that tool's patch first, then call "
                           "tle.uninstall()")
    torch.Tensor.__repr__ = _original_repr  # type: ignore[method-assign]
    _original_repr = None


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """``with installed():`` summary reprs inside, the previous ``__repr__`` after.

    >>> with installed():
    ...     "f32" in repr(torch.ones(1))
    True
    """
    was_installed = _original_repr is not None
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()

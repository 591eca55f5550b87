"""Print options that learners can read, and that always come back as they were.

``torch.set_printoptions`` has two traps: it resets ``sci_mode`` whenever you do not pass it,
and a ``profile`` silently resets every option you do not pass. Here every change starts from
the *current* state (read from ``torch._tensor_str.PRINT_OPTS``), returns what was there before,
and ``printoptions(...)`` puts back that exact state on exit, also on exceptions and nested.

``install()`` makes ``repr(tensor)`` start with ``describe``'s summary line, reversibly.

Threads: torch's print options and ``Tensor.__repr__`` are one per process. Blocks entered from
several threads share them under a lock: each block, when it leaves, hands what it found on
entry to the block entered after it (still open), so the options come back exactly as they were
when the last block leaves, whatever the order. Entering and leaving are uninterruptible.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from torchlens_edu._core.formatting import did_you_mean
from torchlens_edu._core.interrupts import arm, disarm, safe_contextmanager
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


# name -> every one of torch's five print options, so that a preset prints the same whatever was
# set before it (callables are evaluated when the preset is applied: the terminal can change).
# README.md ("Seeing tensors") lists them; a test keeps the two in step.
PRESETS: dict[str, dict[str, Any]] = {
    # few values per axis, summarised early, and always fixed-point: 0.6480, never 6.4804e-01
    # (torch switches a whole tensor to e-notation when its values span a wide range, which is
    # exactly what attention weights and activations do)
    "edu": {"precision": 4, "edgeitems": 4, "threshold": 30, "linewidth": _terminal_width,
            "sci_mode": False},
    "short": {"precision": 2, "edgeitems": 2, "threshold": 16, "linewidth": _terminal_width,
              "sci_mode": False},
    # every value, in torch's automatic notation (a 1e-9 stays visible instead of 0.0000)
    "full": {"precision": 4, "edgeitems": 3, "threshold": math.inf,
             "linewidth": _terminal_width, "sci_mode": None},
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
    if preset is not None and not isinstance(preset, str):
        digits = (f"; for {preset} digits after the decimal point pass precision={preset}"
                  if isinstance(preset, int) and not isinstance(preset, bool) else "")
        raise TypeError(f"a print preset is a name ({', '.join(map(repr, PRESETS))}) or None, "
                        f"not {type(preset).__name__} {preset!r}{digits}")
    if preset is not None and preset not in PRESETS:
        hint = did_you_mean(preset, PRESETS)
        hint = f" ({hint})" if hint else ""
        raise ValueError(f"unknown print preset {preset!r}{hint}; choose one of "
                         f"{', '.join(map(repr, PRESETS))}, or None to keep the current options")
    # a preset's value may be computed when applied (the terminal's width); a value the user
    # gives is taken as it is (a callable there is a mistake for _check_option to name)
    resolved = {k: (v() if callable(v) else v)
                for k, v in (PRESETS[preset] if preset is not None else {}).items()}
    resolved.update(overrides)
    for name, value in resolved.items():
        _check_option(name, value)
    return resolved


def _check_option(name: str, value: Any) -> None:
    """Refuse what torch accepts and then fails on at every repr (``precision=-3``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "sci_mode":
        ok, want = value is None or isinstance(value, bool), "True, False or None (automatic)"
    elif name == "threshold":
        ok, want = number and value >= 0, "a number >= 0 (math.inf: never summarise)"
    else:
        minimum = 1 if name == "linewidth" else 0
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        want = {"precision": "an int >= 0 (digits after the decimal point)",
                "edgeitems": "an int >= 0 (items shown at each end when summarising)",
                "linewidth": "an int >= 1 (characters per line)"}[name]
    if not ok:
        raise ValueError(f"print option {name}={value!r}: give {want}")


def set_printoptions(preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Apply a preset (``"edu"``, ``"short"``, ``"full"``, ``"default"``) and/or single options.

    A preset sets all five options. ``"edu"``: precision=4, edgeitems=4, threshold=30,
    linewidth=the terminal's width (80 to 160; 100 when output is not a terminal),
    sci_mode=False (fixed-point, never e-notation). ``"short"``: the same with precision=2,
    edgeitems=2, threshold=16. ``"full"``: precision=4, edgeitems=3, threshold=inf (never
    summarised), the terminal's width, sci_mode=None (torch decides). ``"default"``: torch's
    own defaults (4, 3, 1000, 80, None).

    Options you do not name keep their current value (``sci_mode`` too, unlike
    ``torch.set_printoptions``). Returns the previous options: ``set_printoptions(**old)``
    restores them exactly.

    >>> old = set_printoptions("edu", precision=2)
    >>> torch._tensor_str.PRINT_OPTS.threshold
    30
    >>> _ = set_printoptions(**old)
    """
    chosen = _resolve(preset, overrides)
    with _lock:
        previous = get_printoptions()
        _restore(chosen)
    return previous


_lock = threading.RLock()  # print options and Tensor.__repr__: one per process


@dataclass(kw_only=True, eq=False)  # blocks are found by identity: two may hold equal options
class _Block:
    """One open ``printoptions`` block: what it set, and what to put back when it leaves."""

    chosen: dict[str, Any]
    previous: dict[str, Any]


_open_blocks: list[_Block] = []  # in the order they were entered, all threads


@safe_contextmanager
def printoptions(preset: str | None = None, **overrides: Any) -> Iterator[dict[str, Any]]:
    """``with printoptions("edu"):`` ... then the exact previous options, whatever happened.

    Blocks from several threads may overlap: the options come back as they were once the last
    one leaves (see the module docstring).

    >>> with printoptions(precision=2):
    ...     print(torch.tensor([1.23456]))
    tensor([1.23])
    """
    chosen = _resolve(preset, overrides)
    with _lock:
        block = _Block(chosen=chosen, previous=get_printoptions())
        _open_blocks.append(block)
        _restore(chosen)
        arm(block)
        applied = get_printoptions()
    try:
        yield applied
    finally:
        with _lock:
            _leave(block)
            disarm(block)


def _leave(block: _Block) -> None:
    index = _open_blocks.index(block)
    del _open_blocks[index]
    if index == len(_open_blocks):  # the latest block (always so within one thread)
        _restore(block.previous)
        return
    # A block entered later is still open (another thread): it inherits what this one found,
    # and the options become that plus what the open blocks chose, without this block's.
    _open_blocks[index].previous = block.previous
    state = dict(_open_blocks[index].previous)
    for later in _open_blocks[index:]:
        state.update(later.chosen)
    _restore(state)


def apply_env_preset() -> None:
    """Apply ``$TORCHLENS_EDU_PRINT`` (a preset name), as ``import torchlens_edu`` does.

    A wrong name warns instead of breaking the import (e.g. inside a VS Code launch config).

    >>> os.environ[ENV_VAR] = "edu"
    >>> with printoptions():  # puts the current options back afterwards
    ...     apply_env_preset()
    ...     get_printoptions()["threshold"]
    30
    >>> del os.environ[ENV_VAR]
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
_summary_repr: Any = None  # the __repr__ install() put in its place
_installed_blocks: list[object] = []  # open installed() blocks, all threads
_installed_before_blocks = False  # whether install() had been called when the first one opened


def _summary_repr_over(original: Any) -> Any:
    # The original is bound here, not read from a global: a repr running in one thread while
    # another uninstalls still has it.
    def __repr__(self: torch.Tensor, /, *, tensor_contents: Any = None) -> str:
        return describe(self) + "\n" + original(self, tensor_contents=tensor_contents)

    return __repr__


def install() -> None:
    """Make ``repr(tensor)`` start with ``describe``'s line (like lovely-tensors' monkey_patch).

    Undo with ``uninstall()``; calling ``install()`` twice is harmless.

    >>> install()
    >>> print(repr(torch.zeros(2)).splitlines()[0])
    Tensor[2] f32 cpu n=2 (8 B) all zeros NaN:0
    >>> uninstall()
    """
    global _original_repr, _summary_repr
    with _lock:
        if _original_repr is not None:
            return
        original = torch.Tensor.__dict__["__repr__"]
        _summary_repr = _summary_repr_over(original)
        # a patch by design (undone by uninstall); torch leaves its __repr__ unannotated
        torch.Tensor.__repr__ = _summary_repr  # type: ignore[method-assign]
        _original_repr = original


def uninstall() -> None:
    """Put back the exact ``torch.Tensor.__repr__`` that ``install()`` found.

    >>> uninstall()  # not installed: nothing to do
    """
    global _original_repr, _summary_repr
    with _lock:
        if _original_repr is None:
            return
        if torch.Tensor.__dict__.get("__repr__") is not _summary_repr:
            raise RuntimeError("torch.Tensor.__repr__ was replaced again after tle.install() "
                               "(another tool patched it); undo that tool's patch first, then "
                               "call tle.uninstall()")
        torch.Tensor.__repr__ = _original_repr  # type: ignore[method-assign]
        _original_repr = _summary_repr = None


@safe_contextmanager
def installed() -> Iterator[None]:
    """``with installed():`` summary reprs inside, the previous ``__repr__`` after.

    Blocks from several threads may overlap: the last one to leave puts the previous
    ``__repr__`` back.

    >>> with installed():
    ...     "f32" in repr(torch.ones(1))
    True
    """
    global _installed_before_blocks
    block = object()
    with _lock:
        if not _installed_blocks:
            _installed_before_blocks = _original_repr is not None
        _installed_blocks.append(block)
        install()
        arm(block)
    try:
        yield
    finally:
        with _lock:
            _installed_blocks.remove(block)
            if not _installed_blocks and not _installed_before_blocks:
                uninstall()
            disarm(block)

"""Checks of the arguments many public functions share, so that a wrong kind of value gets one
clear message at the call (``compare(backward=None): give True or False``), not a traceback from
deep inside torch or rich, and never a silent guess (a truthy string taken as True).
"""

from __future__ import annotations

import reprlib

from rich.console import Console

from torchlens_edu._core.console import get_console

_short = reprlib.Repr()
_short.maxother = 40  # a tensor or a model given by mistake: its repr's start is enough
_short.maxstring = 40


def require_flag(value: object, name: str, who: str) -> bool:
    """``value`` if it is ``True`` or ``False``, else a TypeError naming the argument.

    >>> require_flag(True, "ops", "trace_shapes")
    True
    >>> require_flag("yes", "ops", "trace_shapes")
    Traceback (most recent call last):
    ...
    TypeError: trace_shapes(ops='yes'): give True or False
    """
    if isinstance(value, bool):
        return value
    raise TypeError(f"{who}({name}={_short.repr(value)}): give True or False")


def console_argument(console: object, who: str) -> Console:
    """The rich Console to print to: ``console`` if given, else one for the current
    environment; anything else is a TypeError that says what to give.

    >>> console_argument(None, "show").is_terminal in (True, False)
    True
    >>> console_argument("stdout", "show")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: show(console='stdout'): give a rich.console.Console, or leave it out ...
    """
    if console is None:
        return get_console()
    if isinstance(console, Console):
        return console
    raise TypeError(f"{who}(console={_short.repr(console)}): give a rich.console.Console, or leave "
                    "it out to print to the terminal or notebook")

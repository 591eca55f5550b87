"""Checks of the arguments many public functions share, so that a wrong kind of value gets one
clear message at the call (``compare(backward=None): give True or False``), not a traceback from
deep inside torch or rich, and never a silent guess (a truthy string taken as True).
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rich.console import Console

from torchlens_edu._core.console import get_console
from torchlens_edu._core.formatting import did_you_mean

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


def signature_refusing(fn: Callable[..., Any], count: int) -> inspect.Signature | None:
    """``fn``'s signature when it cannot be called with ``count`` positional arguments, else
    None (also when it has no readable signature: a builtin; its own call will say).

    >>> str(signature_refusing(lambda module, args, output: None, 1))
    '(module, args, output)'
    >>> signature_refusing(lambda call: None, 1) is None
    True
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*[None] * count)
    except TypeError:
        return signature
    return None


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


def forward_keywords(model: Any, kwargs: Mapping[str, Any], options: Iterable[str],
                     who: str) -> None:
    """Check the keywords a call passes on to ``model``'s forward (``trace_shapes(model, x,
    op=True)``): one that the forward does not name but that is close to one of ``who``'s own
    options is a typo, not an argument for the model, and gets a TypeError that says so
    (else it would fail inside the forward, or vanish into its ``**kwargs``).

    >>> import torch.nn as nn
    >>> forward_keywords(nn.Linear(2, 2), {"op": True}, ["ops", "meta"], "trace_shapes")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: trace_shapes(op=...): 'op' is not an option of trace_shapes (did you mean ...
    """
    try:
        named = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature: the model will say
        return
    for name in kwargs:
        hint = "" if name in named else did_you_mean(name, options)
        if hint:
            raise TypeError(f"{who}({name}=...): {name!r} is not an option of {who} ({hint}) nor "
                            f"a parameter of {type(model).__name__}.forward; {who} passes the "
                            "keywords it does not know on to the model's forward")

"""Ctrl-C never cuts an observer's attach or detach in half.

A ``KeyboardInterrupt`` can arrive between any two bytecodes, even at the first line of an
``__exit__``. Landing in the middle of "register five hooks" or "restore the print options", it
would leave half of them behind. So the code that attaches or detaches runs
``@uninterruptible``: a Ctrl-C that arrives meanwhile is held and raised (still as
``KeyboardInterrupt``, through the handler that was installed before) as soon as the outermost
such call returns. The forward itself is never held: Ctrl-C stops a long run at once.

How: while an observer is attached (:func:`arm`), and during every ``@uninterruptible`` call, a
SIGINT handler is installed that looks at the interrupted frames. If one of them is an
``@uninterruptible`` call, it notes the interrupt; if one is the enter or exit of someone
else's context manager (a ``contextlib`` one, such as the one torch pops its function modes
with during every traced op, or ``torch.no_grad``), it sends the interrupt again a millisecond
later, when that block is whole; otherwise it calls the previous handler (``KeyboardInterrupt``
at once, as without us). Only the main thread receives SIGINT, and only
there can a handler be installed: elsewhere these are plain calls. When the last observer is
detached, the previous handler is put back (unless someone replaced ours meanwhile).

Code that runs *during* the forward (an observer's hook) stays interruptible, so it must not
hold global state in a Python context manager: ``with torch.no_grad():`` left grad mode off
when the Ctrl-C landed on the first line of its ``__exit__``. :func:`call_without_grad` is
the airtight replacement.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any, ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

_armed: set[int] = set()  # ids of attached observers (main thread)
_previous: Any = None  # the SIGINT handler ours replaced; None while ours is not installed
_pending = False  # a Ctrl-C arrived inside an uninterruptible call
_CODES: set[CodeType] = set()  # the frames of an uninterruptible call: wrappers and the call
# ids of the frames of the outermost uninterruptible call (and its wrapper) once it has raised
# what it held and is returning: a Ctrl-C there would be held with nobody left to raise it, so
# it is sent again once they have returned. (ids: holding the frames would keep their locals.)
_returning: tuple[int, int] = (0, 0)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _pending
    frame = frame if frame is not None else sys._getframe(1)
    held = _held_by(frame)
    if held == "ours":
        _pending = True
    elif held == "later":
        threading.Timer(_AGAIN_AFTER_S, _thread.interrupt_main).start()
    else:
        _previous(signum, frame)


_AGAIN_AFTER_S = 0.001  # a context manager's enter or exit is long done by then


def _foreign_codes() -> frozenset[CodeType]:
    """Enter/exit code of context managers that hold global state and are not ours."""
    holders: list[Any] = [contextlib._GeneratorContextManager, torch.no_grad, torch.enable_grad,
                          torch.set_grad_enabled, torch.inference_mode]
    return frozenset(method.__code__ for holder in holders for cls in holder.__mro__
                     for name in ("__init__", "__enter__", "__exit__")
                     if cls is not object and hasattr(method := vars(cls).get(name), "__code__"))


_FOREIGN = _foreign_codes()


def _held_by(frame: FrameType | None) -> str:
    """"ours" (an uninterruptible call raises it when it returns), "later" (send it again in a
    moment: a call is returning, or someone else's context manager is entering or exiting),
    or "" (raise it now)."""
    later = False
    while frame is not None:
        if id(frame) in _returning:
            return "later"  # the outermost call (or its wrapper) is on its way out
        if frame.f_code in _CODES:
            return "ours"
        later = later or frame.f_code in _FOREIGN
        frame = frame.f_back
    return "later" if later else ""


def _in_uninterruptible(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code in _CODES:
            return True
        frame = frame.f_back
    return False


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install() -> None:
    global _previous
    current = signal.getsignal(signal.SIGINT)
    if current is _on_sigint:
        return
    # not ours (never installed, or replaced since: then the replacement is what we hold for)
    if callable(current):  # SIG_DFL / SIG_IGN: nothing to hold
        signal.signal(signal.SIGINT, _on_sigint)
        _previous = current


def _uninstall_if_idle() -> None:
    global _previous
    if _armed or _previous is None:
        return
    if signal.getsignal(signal.SIGINT) is _on_sigint:  # someone else's handler stays theirs
        signal.signal(signal.SIGINT, _previous)
    _previous = None


def _raise_pending() -> None:
    """Deliver a held Ctrl-C through the handler it was meant for."""
    global _pending
    if not _pending:
        return
    _pending = False
    handler = _previous if _previous is not None else signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _on_sigint:
        handler(signal.SIGINT, None)


def call_without_grad(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` with autograd off; grad mode comes back whatever interrupts it.

    >>> call_without_grad(torch.ones(1, requires_grad=True).mul, 2).requires_grad
    False
    """
    previous = torch.is_grad_enabled()
    try:  # set inside the try, restored by a C call first thing in finally: no gap for Ctrl-C
        torch._C._set_grad_enabled(False)
        return fn(*args, **kwargs)
    finally:
        torch._C._set_grad_enabled(previous)


def arm(owner: object) -> None:
    """``owner`` holds state until :func:`disarm`: keep Ctrl-C handling ready for its detach.

    Call it from ``@uninterruptible`` code. A no-op off the main thread.

    >>> class Observer: ...
    >>> owner = Observer()
    >>> arm(owner); disarm(owner)
    """
    if _on_main_thread():
        _armed.add(id(owner))
        _install()


def disarm(owner: object) -> None:
    """``owner`` holds nothing any more (idempotent). See :func:`arm`."""
    if _on_main_thread():
        _armed.discard(id(owner))
        _uninstall_if_idle()


def _uninterruptible_call(fn: Callable[..., Any], undo: Callable[[Any], Any] | None,
                          args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # The SIGINT handler recognises this function's frames: keep all the work inside it.
    if not _on_main_thread():
        return fn(*args, **kwargs)
    global _returning
    _install()
    outermost = not _in_uninterruptible(sys._getframe(2))  # above the decorator's wrapper
    if outermost:
        _returning = (0, 0)
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        if outermost:
            _returning = _frame_ids()
            _finish()
        raise
    if outermost:
        _returning = _frame_ids()  # a Ctrl-C from here on goes to our caller, not to _pending
        if _pending and undo is not None:
            undo(args[0])  # __enter__ succeeded but will raise: detach before it does
        _finish()
    return result


def _frame_ids() -> tuple[int, int]:
    call = sys._getframe(1)  # _uninterruptible_call; its f_back is the decorator's wrapper
    return id(call), id(call.f_back)


_CODES.add(_uninterruptible_call.__code__)


def _finish() -> None:
    try:
        _raise_pending()
    finally:
        _uninstall_if_idle()


def uninterruptible(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: a Ctrl-C during ``fn`` is raised when it returns, not in the middle.

    >>> @uninterruptible
    ... def attach(): return "all hooks or none"
    >>> attach()
    'all hooks or none'
    """
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return _uninterruptible_call(fn, None, args, kwargs)

    _CODES.add(wrapper.__code__)  # a Ctrl-C at its first line is held too
    return functools.wraps(fn)(wrapper)


def uninterruptible_enter(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator for ``__enter__``: uninterruptible, and a Ctrl-C held during it runs the
    object's ``__exit__`` before it is raised (the ``with`` block would never call it).

    >>> class Block:
    ...     @uninterruptible_enter
    ...     def __enter__(self): return self
    ...     def __exit__(self, *exc): pass
    >>> with Block(): pass
    """
    def undo(self: Any) -> None:
        type(self).__exit__(self, KeyboardInterrupt, KeyboardInterrupt(), None)

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return _uninterruptible_call(fn, undo, args, kwargs)

    _CODES.add(wrapper.__code__)
    return functools.wraps(fn)(wrapper)


class _SafeGeneratorContextManager(contextlib._GeneratorContextManager):
    @uninterruptible_enter
    def __enter__(self) -> Any:
        return super().__enter__()

    @uninterruptible
    def __exit__(self, typ: Any, value: Any, traceback: Any) -> bool | None:
        return super().__exit__(typ, value, traceback)


def safe_contextmanager(fn: Callable[P, Iterator[R]]
                        ) -> Callable[P, contextlib.AbstractContextManager[R]]:
    """``contextlib.contextmanager`` whose setup (up to ``yield``) and cleanup (after it) are
    :func:`uninterruptible`. Keep both short: the ``with`` block's body stays interruptible.

    >>> @safe_contextmanager
    ... def block():
    ...     yield "inside"
    >>> with block() as value: value
    'inside'
    """
    @functools.wraps(fn)
    def helper(*args: P.args, **kwargs: P.kwargs) -> contextlib.AbstractContextManager[R]:
        # contextlib types the function as returning a Generator; an Iterator is what it needs
        return _SafeGeneratorContextManager(fn, args, kwargs)  # type: ignore[arg-type]

    return helper

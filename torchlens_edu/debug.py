"""Stop points: places where a debugger (or pdb) pauses, with the interesting tensors as locals.

- Named stop points in the bundled models: ``attention`` pauses in GPT-2's attention forward on
  the line after its ``att`` hook point (right after the softmax), with ``q``, ``k``, ``v``,
  ``scores`` and ``att`` as locals. Off unless asked for: by environment
  (``TORCHLENS_EDU_STOP=attention`` or ``TORCHLENS_EDU_STOP=attention:layer=3,head=1``; several
  joined with ``;``; read when ``torchlens_edu`` is imported and whenever a stop is asked for
  or cleared), by :func:`stop_at`, or by ``torchlens-edu debug --stop attention:layer=3``.
  The model knows nothing of this module: while a stop is requested, one process-wide forward
  hook (``torch.nn.modules.module.register_module_forward_hook``) watches for hook points, and
  any module hook makes GPT-2 take its explicit attention path. No stop, no hook.
- Any module of any model: :func:`stop_at_module` pauses after its forward (or backward) in a
  frame whose locals are ``module``, ``inputs``, ``output`` (or the gradients).
- :func:`listen`: a debugpy server on 127.0.0.1 that VS Code attaches to.

Where it pauses: a stop point pauses in the model's own frame (debugpy and pdb are told which
frame); a module stop in the hook that calls ``breakpoint()``. Without a debugger, pdb opens
when stdin is a terminal; otherwise (CI, pipes) the stop is skipped with one message: never a
hang.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from types import FrameType
from typing import Any, Literal

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from torchlens_edu._core.arguments import signature_refusing
from torchlens_edu._core.console import get_console
from torchlens_edu._core.debugger import debugger_attached
from torchlens_edu._core.formatting import did_you_mean
from torchlens_edu._core.frames import user_frame
from torchlens_edu._core.interrupts import uninterruptible
from torchlens_edu._core.modules import Pattern, is_hook_point, match_modules

ENV_VAR = "TORCHLENS_EDU_STOP"

# stop point -> what the learner finds there
STOP_POINTS: dict[str, str] = {
    "attention": "q, k, v (B, nh, T, hs), scores and att (B, nh, T, Tk) are the locals",
}
_VALID_FORMS = ("attention, attention:layer=L or attention:layer=L,head=H "
                "(several joined with ';')")


@dataclass(frozen=True)
class StopRequest:
    """Where to stop: a stop-point name and optional layer / head filters (by keyword).

    >>> str(StopRequest("attention", layer=3, head=1))
    'attention:layer=3,head=1'
    """

    point: str
    _: KW_ONLY
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.point, str):
            raise TypeError(f"a stop point is a name ({', '.join(map(repr, STOP_POINTS))}), "
                            f"not {type(self.point).__name__} {self.point!r}")
        if self.point not in STOP_POINTS:
            hint = did_you_mean(self.point, STOP_POINTS)
            hint = f" ({hint})" if hint else ""
            raise ValueError(f"unknown stop point {self.point!r}{hint}; the stop points are: "
                             f"{', '.join(STOP_POINTS)}")
        for name in ("layer", "head"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r}: give a layer / head index >= 0, or None "
                                 "for all of them")

    def __str__(self) -> str:
        options = [f"{k}={v}" for k, v in (("layer", self.layer), ("head", self.head))
                   if v is not None]
        return self.point + (":" + ",".join(options) if options else "")

    def out_of_range(self, *, n_layer: int, n_head: int) -> str | None:
        """What is wrong with this stop in a model of that size; None when nothing is.

        >>> StopRequest("attention", layer=7).out_of_range(n_layer=4, n_head=4)
        'attention:layer=7 never stops: the model has 4 layers, so layer is 0 to 3'
        """
        if self.layer is not None and self.layer >= n_layer:
            return (f"{self} never stops: the model has {n_layer} layers, so layer is 0 to "
                    f"{n_layer - 1}")
        if self.head is not None and self.head >= n_head:
            return (f"{self} names no head: the model has {n_head} heads, so head is 0 to "
                    f"{n_head - 1}")
        return None


class StopHandle:
    """A stop requested with :func:`stop_at`: ``.remove()`` it, or use it as a context manager.

    >>> with stop_at("attention", layer=1) as stop:
    ...     str(stop.request)
    'attention:layer=1'
    """

    def __init__(self, request: StopRequest) -> None:
        self.request = request
        _update(add=request)

    def remove(self) -> None:
        """Forget this stop (no-op when already removed)."""
        _update(remove=self.request)

    def __enter__(self) -> StopHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"StopHandle({self.request})"


_lock = threading.RLock()  # guards the request lists and the global hook's registration
_requests: list[StopRequest] = []
_env_requests: list[StopRequest] = []  # from $TORCHLENS_EDU_STOP, until clear_stops()
_env_seen = ""  # the value of $TORCHLENS_EDU_STOP read last: each value is applied once
_hook: RemovableHandle | None = None  # the global forward hook, registered while stops exist
_warned: set[str] = set()  # messages already given (one each)


def parse_stops(value: str) -> list[StopRequest]:
    """Read ``"attention:layer=3,head=1;attention:layer=5"`` (the ``--stop`` / env syntax).

    >>> parse_stops("attention:layer=3,head=1")
    [StopRequest(point='attention', layer=3, head=1)]
    """
    requests = []
    for part in filter(None, (p.strip() for p in value.split(";"))):
        point, _, options = part.partition(":")
        kwargs: dict[str, int] = {}
        for option in filter(None, (o.strip() for o in options.split(","))):
            key, _, number = (s.strip() for s in option.partition("="))
            if key not in ("layer", "head") or not number.isdigit():
                raise ValueError(f"cannot read the stop option {option!r} in {value!r}; "
                                 "write e.g. 'attention:layer=3,head=1'")
            kwargs[key] = int(number)
        requests.append(StopRequest(point.strip(), **kwargs))
    return requests


def stop_at(point: str, *, layer: int | None = None, head: int | None = None) -> StopHandle:
    """Ask the bundled models to pause at a stop point (``"attention"``), optionally only in
    one layer; ``head`` names the head to look at (``att[:, head]``) when it pauses.

    >>> stop = stop_at("attention", layer=3); stop.remove()
    """
    read_env()
    return StopHandle(StopRequest(point, layer=layer, head=head))


def clear_stops() -> None:
    """Forget every stop: those from :func:`stop_at` and ``--stop``, and the one read from
    ``$TORCHLENS_EDU_STOP`` (it comes back only if the variable is set to a new value).

    >>> clear_stops()
    """
    read_env()
    _update(clear=True)


def read_env() -> None:
    """Apply ``$TORCHLENS_EDU_STOP`` if it changed since it was last read (``import
    torchlens_edu`` calls this). A value that cannot be read warns once with the valid forms
    and requests nothing: a typo in a launch configuration never breaks a forward.

    >>> read_env()
    """
    global _env_seen
    value = os.environ.get(ENV_VAR, "").strip()
    with _lock:
        if value == _env_seen:
            return
        _env_seen = value
        try:
            requests = parse_stops(value)
        except ValueError as err:
            requests = []
            _say(f"[yellow]torchlens_edu: ignoring ${ENV_VAR}={value!r}[/]: {err}. "
                 f"Valid forms: {_VALID_FORMS}")
        _update(env=requests)


def _all_requests() -> list[StopRequest]:
    with _lock:
        return [*_requests, *_env_requests]


def _matching(point: str, layer: int | None) -> list[StopRequest]:
    return [r for r in _all_requests()
            if r.point == point and (r.layer is None or r.layer == layer)]


def requested_stops() -> list[StopRequest]:
    """Every stop requested now (by :func:`stop_at`, ``--stop`` or the environment).

    >>> requested_stops()
    []
    """
    read_env()
    return _all_requests()


def stop_requested(point: str, *, layer: int | None = None) -> bool:
    """True when a stop at ``point`` (for this layer) is requested.

    >>> stop_requested("attention", layer=0)
    False
    """
    read_env()
    return bool(_matching(point, layer))


@uninterruptible  # a Ctrl-C waits: the requests and the global hook always agree
def _update(*, add: StopRequest | None = None, remove: StopRequest | None = None,
            clear: bool = False, env: list[StopRequest] | None = None) -> None:
    """Change the requested stops and keep the global hook in step with them."""
    with _lock:
        if add is not None:
            _requests.append(add)
        if remove is not None and remove in _requests:
            _requests.remove(remove)
        if clear:
            _requests.clear()
            _env_requests.clear()
        if env is not None:
            _env_requests[:] = env
        _watch_hook_points()


def _watch_hook_points() -> None:
    """Register the global forward hook while any stop is requested, remove it when none is.
    (Called by :func:`_update`, with ``_lock`` held.)"""
    global _hook
    wanted = bool(_requests or _env_requests)
    if wanted and _hook is None:
        _hook = nn.modules.module.register_module_forward_hook(_at_hook_point)
    elif not wanted and _hook is not None:
        _hook.remove()
        _hook = None


def _at_hook_point(module: nn.Module, args: Any, output: Any) -> None:
    """Torch's global forward hook, registered only while a stop is requested: pause when the
    ``att`` hook point of an attention forward that a stop asks for has run."""
    if not is_hook_point(module):
        config = getattr(module, "config", None)  # a whole model, e.g. GPT2, finished
        if config is not None:
            _warn_out_of_range(config)
        return None
    frame = user_frame(sys._getframe(1))  # the forward that called the hook point
    if frame is None:
        return None
    owner = frame.f_locals.get("self")
    if owner is None or getattr(owner, "att", None) is not module:
        return None  # another hook point (q, k, ...) or another model's
    layer = getattr(owner, "layer_idx", None)
    matching = _matching("attention", layer)
    if not matching or not _can_pause("stop point 'attention'"):  # said once, not per layer
        return None
    where = "stop point 'attention'" + (f" (layer {layer})" if layer is not None else "")
    heads = sorted({r.head for r in matching if r.head is not None})
    hint = "".join(f"; head {h}: att[:, {h}]" for h in heads)
    _say(f"[bold]⏸ {where}[/]: {STOP_POINTS['attention']}{hint}")
    _pause_in(frame)
    return None


def _warn_out_of_range(config: Any) -> None:
    """A stop for layer 7 of a 4-layer model would silently never fire: say so, once."""
    n_layer, n_head = getattr(config, "n_layer", None), getattr(config, "n_head", None)
    if not (isinstance(n_layer, int) and isinstance(n_head, int)):
        return
    for request in _all_requests():
        reason = request.out_of_range(n_layer=n_layer, n_head=n_head)
        if reason is not None and reason not in _warned:
            _warned.add(reason)
            _say(f"[yellow]torchlens_edu: {reason}[/]")


def _pause_in(frame: FrameType) -> None:
    """Pause in ``frame`` at its next line, not in the hook that is running now."""
    hook_module = getattr(sys.breakpointhook, "__module__", None) or ""
    if hook_module.startswith(("debugpy", "pydevd")) and "pydevd" in sys.modules:
        # what debugpy's breakpoint() does, with the frame given instead of its caller's
        sys.modules["pydevd"].settrace(suspend=True, trace_only_current_thread=True,
                                       patch_multiprocessing=False, stop_at_frame=frame,
                                       notify_stdin=False)
    elif sys.breakpointhook is sys.__breakpointhook__ and _breakpoint_env() in _PDB:
        _pdb_in(frame)
    elif sys.breakpointhook is sys.__breakpointhook__ and _breakpoint_env() == "0":
        return  # breakpoint() is switched off by the user's choice
    else:  # another debugger owns breakpoint(): it pauses here; say how far up the model is
        up = 0
        outer: FrameType | None = sys._getframe()
        while outer is not None and outer is not frame:
            up, outer = up + 1, outer.f_back
        _say(f"[dim]the model's frame is {up} frames up: type `up {up}` in the debugger[/]")
        sys.breakpointhook()


_PDB = ("", "pdb.set_trace", "pdb")  # $PYTHONBREAKPOINT values that mean plain pdb


def _breakpoint_env() -> str:
    return os.environ.get("PYTHONBREAKPOINT", "").strip()


def _pdb_in(frame: FrameType) -> None:
    """``pdb.set_trace`` aimed at ``frame``: it stops on the next line of ``frame`` (as ``next``
    would), not in the hooks and torch code between here and there."""
    import pdb

    debugger = pdb.Pdb()
    debugger.reset()
    outer: FrameType | None = frame
    while outer is not None:  # what Bdb.set_trace does for its own caller
        outer.f_trace = debugger.trace_dispatch
        debugger.botframe = outer
        outer = outer.f_back
    debugger.set_next(frame)
    sys.settrace(debugger.trace_dispatch)


def _can_pause(where: str) -> bool:
    """Whether a ``breakpoint()`` now pauses usefully; if not, say why once and go on."""
    reason = _pause_blocker()
    if reason is None:
        if debugger_attached() and threading.current_thread() is not threading.main_thread():
            sys.modules["debugpy"].debug_this_thread()  # e.g. autograd's backward threads
        return True
    if where not in _warned:
        _warned.add(where)
        _say(f"[yellow]torchlens_edu: skipped the {where}[/]: {reason}")
    return False


def _pause_blocker() -> str | None:
    """Why ``breakpoint()`` would not pause usefully here; None when it would."""
    hook_module = getattr(sys.breakpointhook, "__module__", None) or ""
    if hook_module.startswith(("debugpy", "pydevd")):  # debugpy owns breakpoint()
        if debugger_attached():
            return None
        return ("debugpy is listening but no debugger is attached yet; attach with VS Code's "
                "'Attach to a process on 127.0.0.1:5678', or listen with wait_for_client=True "
                "(--wait-for-client)")
    if sys.breakpointhook is not sys.__breakpointhook__:
        return None  # another debugger (PyCharm, IPython, ...) owns breakpoint()
    if os.environ.get("PYTHONBREAKPOINT") == "0":
        return None  # breakpoint() is a no-op by the user's choice: harmless
    if os.environ.get("CI") or not _stdin_interactive():
        return ("no debugger is attached and stdin is not a terminal, so pdb could not be used; "
                "run it under VS Code's debugger (`torchlens-edu vscode init` sets that up) "
                "or in a terminal for pdb")
    return None


def _stdin_interactive() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):  # replaced or detached stdin
        return False


def _say(markup: str) -> None:
    get_console(stderr=True).print(markup, soft_wrap=True)  # one line per message, unbroken


# --- any module of any model ----------------------------------------------------------------

When = Literal["forward", "backward"]


class ModuleStop:
    """Pauses after the forward (or during the backward) of the modules matching a pattern.

    Made by :func:`stop_at_module`; ``.remove()`` it or use it as a context manager.

    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> with stop_at_module(m, "0") as stop:
    ...     stop.paths
    ['0']
    """

    def __init__(self, model: nn.Module, pattern: Pattern, when: When,
                 condition: Callable[..., bool] | None) -> None:
        if when not in ("forward", "backward"):
            raise ValueError(f"when={when!r}: choose 'forward' (locals module, inputs, output) "
                             "or 'backward' (locals module, grad_input, grad_output)")
        takes = ("(module, inputs, output)" if when == "forward"
                 else "(module, grad_input, grad_output)")
        if condition is not None and not callable(condition):
            raise TypeError(f"condition must be a function {takes} -> bool, not {condition!r}")
        refused = signature_refusing(condition, 3) if condition is not None else None
        if refused is not None:  # fail now, not in the middle of a forward
            raise TypeError(f"condition must take three arguments {takes} and return a bool; "
                            f"{getattr(condition, '__name__', 'it')}{refused} cannot be called "
                            "with three: write e.g. lambda module, inputs, output: ...")
        found = match_modules(model, pattern)
        self.when = when
        self.paths = [path for path, _ in found]
        self._handles = []
        for path, module in found:
            if when == "forward":
                hook = _forward_stop_hook(path or "<model>", condition)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            else:
                hook = _backward_stop_hook(path or "<model>", condition)
                self._handles.append(module.register_full_backward_hook(hook))

    def remove(self) -> None:
        """Take the hooks off the model again (no-op when already removed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ModuleStop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        shown = ", ".join(self.paths[:4]) + (" ..." if len(self.paths) > 4 else "")
        return f"ModuleStop({self.when}: {shown})"


def _forward_stop_hook(path: str, condition: Callable[..., bool] | None) -> Callable[..., None]:
    def forward_stop(module: nn.Module, inputs: tuple, kwargs: dict, output: Any) -> None:
        if condition is not None and not condition(module, inputs, output):
            return None
        if _can_pause(f"stop after {path}'s forward"):
            _say(f"[bold]⏸ after {path}'s forward[/] ({type(module).__name__}): "
                 "module, inputs, kwargs and output are the locals")
            breakpoint()  # stop point: module, inputs, kwargs and output are the locals here
        return None

    return forward_stop


def _backward_stop_hook(path: str, condition: Callable[..., bool] | None) -> Callable[..., None]:
    def backward_stop(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        if condition is not None and not condition(module, grad_input, grad_output):
            return None
        if _can_pause(f"stop in {path}'s backward"):
            _say(f"[bold]⏸ in {path}'s backward[/] ({type(module).__name__}): module, grad_input "
                 "(d loss / d inputs) and grad_output (d loss / d output) are the locals")
            breakpoint()  # stop point: module, grad_input and grad_output are the locals here
        return None

    return backward_stop


def stop_at_module(model: nn.Module, pattern: Pattern, *, when: When = "forward",
                   condition: Callable[..., bool] | None = None) -> ModuleStop:
    """Pause when a module matching ``pattern`` (``"transformer.h.3.mlp"``, ``"*.attn"``) has
    run forward, or during its backward, if ``condition(module, inputs, output)`` (or
    ``(module, grad_input, grad_output)``) says so. Works on any ``nn.Module``.

    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> stop = stop_at_module(m, "0", condition=lambda mod, inp, out: bool(out.isnan().any()))
    >>> stop.remove()
    """
    return ModuleStop(model, pattern, when, condition)


# --- a debugger server -----------------------------------------------------------------------

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_listening: tuple[str, int] | None = None  # where this process's debugpy server listens


def listen(port: int = 5678, *, wait_for_client: bool = False,
           host: str = "127.0.0.1") -> tuple[str, int]:
    """Start a debugpy server that VS Code attaches to ("Attach to a process on
    127.0.0.1:5678"); returns the ``(host, port)`` it listens on (``port=0``: any free port).

    Bound to 127.0.0.1: an attached debugger can run any code in this process, so other
    machines are let in only when you pass their interface as ``host`` yourself.

    >>> listen(0)  # doctest: +SKIP
    ('127.0.0.1', 40123)
    """
    import debugpy

    global _listening
    if debugger_attached():
        _say("torchlens_edu: a debugger is already attached; not starting another server")
        return host, port
    if _listening is not None:  # debugpy serves once per process
        _say(f"torchlens_edu: already listening on {_listening[0]}:{_listening[1]}")
        return _listening
    if host not in _LOOPBACK:
        _say(f"[yellow]warning[/]: listening on {host}: anyone who can reach port {port} there "
             "can run code in this process")
    try:
        bound_host, bound_port = debugpy.listen((host, port))
    except (RuntimeError, OSError) as err:
        raise RuntimeError(f"cannot start the debugger server on {host}:{port} ({err}); "
                           "choose another port, e.g. --listen 5679") from err
    _listening = (bound_host, bound_port)
    _say(f"torchlens_edu: debugpy listening on {bound_host}:{bound_port}; attach with VS Code's "
         f"'Attach to a process on 127.0.0.1:5678' (port {bound_port})")
    if wait_for_client:
        _say("torchlens_edu: waiting for the debugger to attach ...")
        debugpy.wait_for_client()
    return bound_host, bound_port


# --- command-line flags ----------------------------------------------------------------------

def add_arguments(parser: Any) -> None:
    """Add ``--stop``, ``--listen`` and ``--wait-for-client`` to an argparse parser.

    >>> import argparse; p = argparse.ArgumentParser(); add_arguments(p)
    >>> p.parse_args(["--stop", "attention:layer=1", "--listen"]).listen
    5678
    """
    parser.add_argument("--stop", metavar="POINT[:layer=N,head=H]", action="append", default=[],
                        help="pause at a stop point, e.g. attention or attention:layer=3,head=1 "
                             f"(also ${ENV_VAR})")
    parser.add_argument("--listen", metavar="PORT", nargs="?", const=5678, type=int,
                        default=None, help="start a debugpy server on 127.0.0.1:PORT "
                                           "(default 5678) for VS Code to attach to")
    parser.add_argument("--wait-for-client", action="store_true",
                        help="with --listen: wait until the debugger has attached")


def apply_arguments(args: Any) -> list[StopHandle]:
    """Act on the flags of :func:`add_arguments`; returns the stops it requested (remove them
    when done).

    >>> import argparse; p = argparse.ArgumentParser(); add_arguments(p)
    >>> [s.remove() for s in apply_arguments(p.parse_args(["--stop", "attention:layer=0"]))]
    [None]
    """
    requests = [r for spec in args.stop for r in parse_stops(spec)]  # all checked before any is set
    if args.listen is not None:
        listen(args.listen, wait_for_client=args.wait_for_client)
    elif args.wait_for_client:
        raise ValueError("--wait-for-client needs --listen [PORT]")
    return [StopHandle(r) for r in requests]

"""Stop points: places where a debugger (or pdb) pauses, with the interesting tensors as locals.

- Named stop points in the bundled models: GPT-2's attention carries
  ``if debug.should_stop("attention", layer=...): breakpoint()`` right after the softmax.
  Inert unless asked for, by environment (``TORCHLENS_EDU_STOP=attention`` or
  ``TORCHLENS_EDU_STOP=attention:layer=3,head=1``; several joined with ``;``), by
  :func:`stop_at`, or by ``torchlens-edu debug --stop attention:layer=3``.
- Any module of any model: :func:`stop_at_module` pauses after its forward (or backward) in a
  frame whose locals are ``module``, ``inputs``, ``output`` (or the gradients).
- :func:`listen`: a debugpy server on 127.0.0.1 that VS Code attaches to.

Where it pauses: with a debugger attached, in the frame that calls ``breakpoint()`` (debugpy
installs ``sys.breakpointhook`` and stops in its caller). Without one, pdb opens there when
stdin is a terminal; otherwise (CI, pipes) the stop is skipped with one message: never a hang.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import torch.nn as nn

from torchlens_edu._core.console import get_console
from torchlens_edu._core.debugger import debugger_attached
from torchlens_edu._core.formatting import did_you_mean
from torchlens_edu._core.modules import Pattern, match_modules

ENV_VAR = "TORCHLENS_EDU_STOP"

# stop point -> what the learner finds there
STOP_POINTS: dict[str, str] = {
    "attention": "q, k, v (B, nh, T, hs), scores and att (B, nh, T, Tk) are the locals",
}


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


class StopHandle:
    """A stop requested with :func:`stop_at`: ``.remove()`` it, or use it as a context manager.

    >>> with stop_at("attention", layer=1) as stop:
    ...     str(stop.request)
    'attention:layer=1'
    """

    def __init__(self, request: StopRequest) -> None:
        self.request = request
        _requests.append(request)

    def remove(self) -> None:
        """Forget this stop (no-op when already removed)."""
        if self.request in _requests:
            _requests.remove(self.request)

    def __enter__(self) -> StopHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"StopHandle({self.request})"


_requests: list[StopRequest] = []
_warned: set[str] = set()  # stop points already reported as skipped (one message each)


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
    return StopHandle(StopRequest(point, layer=layer, head=head))


def clear_stops() -> None:
    """Forget every stop requested through :func:`stop_at`.

    >>> clear_stops()
    """
    _requests.clear()


@functools.lru_cache(maxsize=8)
def _env_stops(value: str) -> tuple[StopRequest, ...]:
    # the stop check runs in every attention forward: parse the variable once per value
    return tuple(parse_stops(value))


def _matching(point: str, layer: int | None) -> list[StopRequest]:
    env = os.environ.get(ENV_VAR, "").strip()
    if not _requests and not env:
        return []
    requests = [*_requests, *(_env_stops(env) if env else ())]
    return [r for r in requests if r.point == point and (r.layer is None or r.layer == layer)]


def stop_requested(point: str, *, layer: int | None = None) -> bool:
    """True when a stop at ``point`` (for this layer) is requested. Cheap when none is.

    >>> stop_requested("attention", layer=0)
    False
    """
    return bool(_matching(point, layer))


def should_stop(point: str, *, layer: int | None = None) -> bool:
    """The check on a stop-point line: True when a stop is requested here *and* pausing can
    work (a debugger is attached, or pdb has a terminal). Otherwise False, after saying once
    why the stop was skipped.

    >>> should_stop("attention", layer=0)
    False
    """
    matching = _matching(point, layer)
    if not matching:
        return False
    if not _can_pause(f"stop point {point!r}"):  # said once per point, not once per layer
        return False
    where = f"stop point {point!r}" + (f" (layer {layer})" if layer is not None else "")
    heads = sorted({r.head for r in matching if r.head is not None})
    hint = "".join(f"; head {h}: att[:, {h}]" for h in heads)
    _say(f"[bold]⏸ {where}[/]: {STOP_POINTS[point]}{hint}")
    return True


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
        if condition is not None and not callable(condition):
            raise TypeError("condition must be a function (module, inputs, output) -> bool "
                            f"(or (module, grad_input, grad_output) -> bool), not {condition!r}")
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

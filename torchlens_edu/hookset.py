"""Hooks on any ``nn.Module``, by module path: look at (or change) what flows through a model.

``hooks(model)`` returns a :class:`HookSet`. Every hook function gets one argument, a
:class:`HookCall` that says which module ran (``path``, ``module``, ``call``: the how-manieth
call of that module in this forward) and what it saw (``args``, ``kwargs``, ``output``, and for
backward hooks ``grad``). Returning ``None`` keeps things as they are; returning a value
replaces the output (forward), the inputs (forward_pre) or the gradient (backward)::

    with tle.hooks(model) as h:
        h.forward("transformer.h.*.mlp", lambda c: print(c.path, c.output.shape))
        h.backward("lm_head", lambda c: print("grad", c.grad.norm()))
        model(ids).sum().backward()

Why it is built this way:
- one torch hook per (module, kind), whatever the number of user functions: the hot path is a
  counter, a small object and the user's call, so hooks on every module stay cheap;
- backward hooks are *tensor* hooks on the module's outputs, registered during the forward.
  ``register_full_backward_hook`` wraps outputs in ``BackwardHookFunction`` views, and the
  in-place op that often follows a module (``h.mul_(2)``, ``ReLU(inplace=True)``) then fails;
  a tensor hook registered before the in-place op receives the gradient of the module's output;
- everything is removed on ``__exit__``/``remove()``, and also when a hook function raises
  or returns something that cannot replace what it would replace, so a failing hook never
  leaves a model half-hooked; adding and removing are uninterruptible (a Ctrl-C waits for them);
- forward hooks see the calls made in the thread that made the ``HookSet`` (several threads may
  hook one model, each sees its own forwards); backward hooks follow the forwards they came
  from, in whatever thread autograd runs them. ``nn.DataParallel`` runs replicas in its own
  threads: a model holding one is hooked in every thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from torchlens_edu._core.arguments import signature_refusing
from torchlens_edu._core.interrupts import arm, disarm, uninterruptible
from torchlens_edu._core.modules import (
    Pattern,
    every_path,
    is_compiled,
    match_modules,
    module_paths,
    require_module,
)
from torchlens_edu._core.replay_state import recomputing, replaying
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.printing.stats import padded_shape

Kind = Literal["forward", "forward_pre", "backward"]
HookFn = Callable[["HookCall"], Any]
_PRUNE_EVERY = 4096  # tensor-hook handles kept before the dead ones (freed outputs) are dropped


@dataclass(slots=True, kw_only=True)
class HookCall:
    """What a hook function sees: one call of one module.

    ``call`` counts this module's calls in the current forward of the hooked model (0, 1, ...:
    a block applied twice, or an embedding shared by encoder and decoder, shows 0 then 1).
    ``path`` is the path the hook's pattern matched: a module reachable under two paths
    (``lm_head`` that is ``transformer.wte``) is hooked once, and each hook sees its own name.
    ``output`` is ``None`` in forward_pre hooks. Backward hooks run once per output tensor that
    gets a gradient: ``grad`` is that gradient and ``index`` the tensor's position among the
    output's tensors (0 for a plain tensor output); their ``args``/``kwargs`` are empty so that
    the graph does not keep the inputs alive for us.

    ``recomputed`` is True when activation checkpointing (``torch.utils.checkpoint``) runs the
    call again inside ``backward()``: hooks still run (a hook that changes an output must
    change the recomputed one too, or the gradients would not match), with the ``call`` index
    of the call it repeats, found by its input (the same tensor, or a detached view of it);
    ``call`` is -1 when the input was itself made by the recomputation (a layer inside the
    checkpointed block). Hooks that count or log skip recomputed calls.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 3))
    >>> with hooks(m) as h:
    ...     _ = h.forward("0", lambda c: print(c.path, c.call, tuple(c.output.shape)))
    ...     _ = m(torch.zeros(1, 2))
    0 0 (1, 3)
    """

    kind: Kind
    path: str
    module: nn.Module
    call: int
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    grad: torch.Tensor | None = None
    index: int = 0
    recomputed: bool = False


class HookSet:
    """Forward, forward-pre and backward hooks on modules chosen by path; removed together.

    Use it as a context manager (hooks are removed on exit, also when the block raises) or
    call :meth:`remove` yourself; removing twice is harmless. Forward hooks run for the
    forwards of the thread that made the set (see the module docstring). Patterns are globs
    over module paths (``"transformer.h.*.attn"``, ``"*.mlp"``, ``"lm_head"``, ``""`` for the
    model itself) or predicates ``(path, module) -> bool``; a pattern that matches nothing
    raises an error that suggests close paths.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> with hooks(m) as h:
    ...     h.forward("1", lambda c: c.output * 0)  # replace ReLU's output
    ...     m(torch.ones(1, 2)).sum().item()
    ['1']
    0.0
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = require_module(model, "hooks()")
        self._paths: dict[nn.Module, str] | None = None
        # (module, kind) -> (path its pattern matched, fn): a module reachable under two paths
        # runs once per call, with one dispatcher; each fn sees the path its pattern named
        self._fns: dict[tuple[nn.Module, Kind], list[tuple[str, HookFn]]] = {}
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        self._removed = False
        self._paused = False
        # forward calls from other threads are theirs (None: every thread, for DataParallel)
        self._thread: int | None = threading.get_ident()
        if any(isinstance(m, nn.DataParallel) for m in self.model.modules()):
            self._thread = None
        self.forwards = 0  # forwards of ``model`` seen since the hooks were added
        self._matched: list[tuple[str, list[tuple[str, nn.Module]]]] = []  # pattern, modules
        self._ran: set[nn.Module] = set()  # hooked modules that were called at least once
        self._replays = 0  # replays of a step by the NaN watch (tle.replaying())

    # -- adding hooks ---------------------------------------------------------------------

    def forward(self, pattern: Pattern, fn: HookFn) -> list[str]:
        """Run ``fn(call)`` after each matching module's forward; a non-None result replaces
        the output. Returns the matched module paths.

        >>> m = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> with hooks(m) as h:
        ...     h.forward("0", lambda call: torch.ones_like(call.output))
        ...     m(torch.zeros(1, 2))
        ['0']
        tensor([[1., 1., 1.]])
        """
        return self._add("forward", pattern, fn)

    def forward_pre(self, pattern: Pattern, fn: HookFn) -> list[str]:
        """Run ``fn(call)`` before each matching module's forward. A non-None result replaces
        the inputs: a tensor replaces the first positional argument, a tuple the positional
        arguments, and a pair ``(args_tuple, kwargs_dict)`` both.

        >>> m = nn.Sequential(nn.Identity(), nn.ReLU())
        >>> with hooks(m) as h:
        ...     h.forward_pre("1", lambda call: call.args[0] + 1)
        ...     m(torch.zeros(1, 2))
        ['1']
        tensor([[1., 1.]])
        """
        return self._add("forward_pre", pattern, fn)

    def backward(self, pattern: Pattern, fn: HookFn) -> list[str]:
        """Run ``fn(call)`` when the gradient of a matching module's output is computed
        (``call.grad``); a non-None result replaces that gradient. Outputs of forwards run
        with grad disabled get no backward hooks.

        >>> m = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> with hooks(m) as h:
        ...     _ = h.backward("0", lambda call: print(call.path, tuple(call.grad.shape)))
        ...     m(torch.ones(1, 2)).sum().backward()
        0 (1, 3)
        """
        return self._add("backward", pattern, fn)

    @uninterruptible
    def _add(self, kind: Kind, pattern: Pattern, fn: HookFn) -> list[str]:
        if self._removed:
            raise RuntimeError("this HookSet was removed (its `with` block ended or .remove() "
                               "was called); make a new one with tle.hooks(model)")
        if not callable(fn):
            raise TypeError(f"a hook function takes one HookCall and returns None or a "
                            f"replacement; got {type(fn).__name__} instead of a function")
        _takes_one_call(fn, kind)
        matched = match_modules(self.model, pattern)
        _refuse_compiled(self.model, [path for path, _ in matched])
        arm(self)
        if not self._handles:  # first hook: count calls per forward of the whole model
            self._handles.append(self.model.register_forward_pre_hook(
                self._new_forward, prepend=True))
        self._matched.append((_pattern_text(pattern), matched))
        for path, module in matched:
            fns = self._fns.get((module, kind))
            if fns is None:
                fns = self._fns[(module, kind)] = []
                self._handles.append(self._install(kind, module, fns))
            fns.append((path, fn))
        return [path for path, _ in matched]

    def _install(self, kind: Kind, module: nn.Module, fns: list[tuple[str, HookFn]]
                 ) -> RemovableHandle:
        # One dispatcher per (module, kind). ``state`` = [forward number, calls in it, where
        # each call's first input lives -> its index]: the call index restarts at each forward
        # of the hooked model without a reset loop.
        state: list[Any] = [-1, 0, {}]
        ran = self._ran

        def next_index(args: tuple) -> tuple[int, bool]:
            """This call's index, and whether it is a checkpoint's recomputation of one."""
            ran.add(module)
            key = _input_key(args)
            if recomputing():  # the same call again, inside backward: its index, not a new one
                return state[2].get(key, -1), True  # -1: its input was made in the recompute
            forward = self._forward_key()
            if state[0] != forward:
                state[0], state[1], state[2] = forward, 0, {}
            if key is not None:
                state[2][key] = state[1]
            state[1] += 1
            return state[1] - 1, False

        # ``*rest``: while another thread registers a kwargs hook, torch may call it for a
        # moment without kwargs (it stores the hook, then the flag); such a call is not ours.
        if kind == "forward_pre":
            def pre(mod: nn.Module, args: tuple, *rest: Any) -> Any:
                if not self._sees_now():
                    return None
                (kwargs,) = rest
                (index, again), changed = next_index(args), False
                for path, fn in fns:
                    result = self._call(fn, HookCall(kind="forward_pre", path=path, module=mod,
                                                     call=index, args=args, kwargs=kwargs,
                                                     recomputed=again),
                                        partial(_as_inputs, args=args, kwargs=kwargs,
                                                path=path))
                    if result is not None:
                        args, kwargs = result
                        changed = True
                return (args, kwargs) if changed else None

            return module.register_forward_pre_hook(pre, with_kwargs=True)

        if kind == "forward":
            def post(mod: nn.Module, args: tuple, *rest: Any) -> Any:
                if not self._sees_now():
                    return None
                kwargs, output = rest
                (index, again), changed = next_index(args), False
                for path, fn in fns:
                    result = self._call(fn, HookCall(kind="forward", path=path, module=mod,
                                                     call=index, args=args, kwargs=kwargs,
                                                     output=output, recomputed=again),
                                        partial(_check_replacement, output=output, path=path))
                    if result is not None:
                        output, changed = result, True
                return output if changed else None

            return module.register_forward_hook(post, with_kwargs=True)

        def watch(mod: nn.Module, args: tuple, output: Any) -> None:
            # After the forward: one gradient hook on each output tensor that will get a grad.
            if not self._sees_now():
                return
            index, again = next_index(args)
            for position, tensor in enumerate(iter_tensors(output)):
                if tensor.requires_grad:
                    self._watch_grad(tensor, mod, index, position, fns, again)

        return module.register_forward_hook(watch)

    def _watch_grad(self, tensor: torch.Tensor, module: nn.Module, index: int,
                    position: int, fns: list[tuple[str, HookFn]], recomputed: bool) -> None:
        def on_grad(grad: torch.Tensor) -> torch.Tensor | None:
            if self._removed:  # an output kept past the block: its hook outlived the set
                return None
            changed = False
            for path, fn in fns:
                result = self._call(fn, HookCall(kind="backward", path=path, module=module,
                                                 call=index, grad=grad, index=position,
                                                 recomputed=recomputed))
                if result is not None:
                    grad, changed = result, True
            return grad if changed else None

        if len(self._tensor_handles) >= _PRUNE_EVERY:  # outputs freed since: their hooks went
            self._tensor_handles = [h for h in self._tensor_handles if h.hooks_dict_ref()]
        self._tensor_handles.append(tensor.register_hook(on_grad))

    def _new_forward(self, module: nn.Module, args: tuple) -> None:
        if not self._sees_now() or recomputing():  # a checkpointed model's recomputation
            return
        if replaying():  # the NaN watch re-running a step: not a forward of the user's
            self._replays += 1
        else:
            self.forwards += 1

    def _sees_now(self) -> bool:
        """Whether the forward running now is one this set looks at."""
        return not self._paused and self._thread in (None, threading.get_ident())

    def _forward_key(self) -> int:
        """Which forward a call belongs to: a replay numbers its calls from 0 again, as the
        step did, without counting as a forward (replays get keys below -1)."""
        return -1 - self._replays if replaying() else self.forwards

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block the hooks do nothing (e.g. for a side run of the same model).

        >>> import torch.nn as nn
        >>> m = nn.Linear(2, 2)
        >>> with hooks(m) as h:
        ...     _ = h.forward("", lambda c: print("seen"))
        ...     with h.paused():
        ...         _ = m(torch.zeros(1, 2))
        """
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def _call(self, fn: HookFn, call: HookCall, check: Callable[[Any], Any] | None = None
              ) -> Any:
        """``fn(call)``; a non-None result goes through ``check`` (which may convert it)."""
        try:
            result = fn(call)
            return check(result) if check is not None and result is not None else result
        except BaseException as error:
            # A failing hook must not leave the model hooked: remove everything, then re-raise.
            self.remove()
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"(raised by a {call.kind} hook on module '{call.path}', call "
                               f"{call.call}; torchlens_edu removed all hooks of this HookSet)")
            raise

    def never_called(self) -> list[tuple[str, str]]:
        """``(path, why)`` for matched modules that never ran while the model did: those of each
        pattern none of whose modules ran (``"*"`` also matches containers, which never run
        while their children do). Empty before the model's first forward.

        >>> import torch.nn as nn
        >>> m = nn.ModuleDict({"fc": nn.Linear(2, 2)})
        >>> m.forward = lambda x: m.fc(x)  # a container whose child is called directly
        >>> with hooks(m) as h:
        ...     _ = h.forward("", lambda c: None)
        ...     _ = m(torch.zeros(1, 2))
        ...     h.never_called()
        []
        """
        if not self.forwards:
            return []
        missed: dict[str, str] = {}
        for _, matched in self._matched:
            if matched and not any(module in self._ran for _, module in matched):
                for path, module in matched:
                    missed.setdefault(path, never_called_because(module, path))
        return list(missed.items())

    def _say_never_called(self) -> None:
        never = self.never_called()
        if not never:
            return
        from torchlens_edu._core.console import get_console

        n, runs = len(never), self.forwards
        lines = [f"torchlens_edu: hooks on {n} matched module{'s' if n > 1 else ''} never ran "
                 f"in {runs} forward{'s' if runs > 1 else ''} of {type(self.model).__name__}:"]
        lines += [f"  {path or '<model>'}: {why}" for path, why in never[:8]]
        if n > 8:
            lines.append(f"  ... and {n - 8} more")
        get_console(stderr=True).print("\n".join(lines), markup=False, highlight=False)

    # -- removing ---------------------------------------------------------------------------

    @uninterruptible
    def remove(self) -> None:
        """Remove every hook this set added (module hooks and gradient hooks); idempotent.

        >>> h = hooks(nn.Linear(2, 2))
        >>> _ = h.forward("*", print)
        >>> h.remove(); h.remove(); h.active
        False
        """
        self._removed = True
        for handle in (*self._handles, *self._tensor_handles):
            handle.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._fns.clear()
        disarm(self)

    @property
    def active(self) -> bool:
        """True while the hooks are installed.

        >>> with hooks(nn.Linear(2, 2)) as h:
        ...     h.active
        True
        >>> h.active
        False
        """
        return not self._removed

    def __enter__(self) -> HookSet:
        return self

    @uninterruptible  # a Ctrl-C at its first line would skip remove()
    def __exit__(self, *exc: object) -> None:
        try:
            self.remove()
        finally:
            if exc[0] is None:  # a silent miss, said once the block is done
                self._say_never_called()

    def paths(self) -> dict[nn.Module, str]:
        """Module -> dotted path, for every module of the model (computed once).

        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> hooks(m).paths()[m[0]]
        '0'
        """
        if self._paths is None:
            self._paths = module_paths(self.model)
        return self._paths

    def __iter__(self) -> Iterator[tuple[str, Kind, int]]:
        """``(path, kind, number of functions)`` for each hooked module."""
        for (_, kind), fns in self._fns.items():
            yield fns[0][0], kind, len(fns)  # the path its (first) pattern matched

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        hooked = ", ".join(f"{kind}:{path or '<model>'}" for path, kind, _ in self)
        return f"HookSet({type(self.model).__name__}, {state}{', ' if hooked else ''}{hooked})"


def never_called_because(module: nn.Module, path: str) -> str:
    """Why a module's hooks may not fire although the model ran.

    >>> never_called_because(nn.ModuleList(), "h").split(";")[1]
    " its children are (hook 'h.*')"
    """
    if type(module).forward is nn.Module.forward or isinstance(
            module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return (f"a {type(module).__name__}: a container has no forward of its own and is never "
                f"called; its children are (hook '{path + '.' if path else ''}*')")
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):  # MHA's alone
        parent = path.rpartition(".")[0]
        return ("nn.MultiheadAttention's out_proj is never called: MultiheadAttention reads "
                "out_proj.weight and .bias inside F.multi_head_attention_forward (or its fused "
                f"kernel); hook '{parent or '<model>'}' for the attention's output")
    if next(module.parameters(), None) is None:  # nothing to use but its forward
        return ("its forward was never called: the model skips it on this input (a branch, "
                "or an option that is off)")
    return (f"its forward was never called: the model skips it on this input, or uses its "
            f"parameters directly (e.g. F.linear(x, {path or 'module'}.weight)) instead of "
            "calling it")


def _input_key(args: tuple) -> tuple[int, torch.Size] | None:
    """Where a call's first input lives. A checkpoint's recomputation gets the same tensor, or
    a detached view of it (the same memory): this names the call it repeats."""
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor):
        return None
    try:
        pointer = first.data_ptr()
    except RuntimeError:  # no storage of its own (sparse, some tensor subclasses)
        return None
    # a nested tensor (nn.TransformerEncoder's padding fast path) has no sizes: its padded shape
    return (pointer, padded_shape(first)) if pointer else None


def _pattern_text(pattern: Pattern) -> str:
    return pattern if isinstance(pattern, str) else getattr(pattern, "__name__", repr(pattern))


def hooks(model: nn.Module) -> HookSet:
    """A :class:`HookSet` on ``model``; use it in a ``with`` block.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> shapes = []
    >>> with hooks(m) as h:
    ...     _ = h.forward("*", lambda c: shapes.append((c.path, tuple(c.output.shape))))
    ...     _ = m(torch.zeros(3, 4))
    >>> shapes[-1]
    ('', (3, 1))
    """
    return HookSet(model)


def _check_replacement(result: Any, output: Any, path: str) -> Any:
    """A tensor output replaced by a non-tensor is nearly always a hook that returned a value
    by accident (``lambda c: d.setdefault(...)``): say so instead of breaking the model."""
    if isinstance(output, torch.Tensor) and not isinstance(result, torch.Tensor):
        raise TypeError(f"a forward hook on '{path}' returned {type(result).__name__}, which "
                        "would replace the module's tensor output. Return None to keep the "
                        "output (a lambda returns the value of its expression), or a tensor "
                        "to replace it.")
    return result


def _as_inputs(result: Any, args: tuple, kwargs: dict, path: str) -> tuple[tuple, dict]:
    """What a forward_pre hook returned, as ``(args, kwargs)``."""
    if isinstance(result, torch.Tensor):
        if not args:
            raise TypeError(f"a forward_pre hook on '{path}' returned a tensor, but the module "
                            "got no positional argument to replace; return (args, kwargs)")
        return (result, *args[1:]), kwargs
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], tuple)
            and isinstance(result[1], dict)):
        return result[0], result[1]
    if isinstance(result, tuple):
        return result, kwargs
    raise TypeError(f"a forward_pre hook on '{path}' returned {type(result).__name__}; return "
                    "None, a tensor (new first argument), a tuple of arguments, or (args, kwargs)")


# what torch's own hooks take, and where a HookCall has the same things
_TORCH_STYLE: dict[Kind, tuple[str, str]] = {
    "forward": ("(module, args, output)", "call.module, call.args, call.output"),
    "forward_pre": ("(module, args)", "call.module, call.args"),
    "backward": ("(module, grad_input, grad_output)", "call.module, call.grad"),
}


def _takes_one_call(fn: Callable[..., Any], kind: Kind) -> None:
    """Refuse, when it is added, a hook function that cannot take one HookCall: one written for
    torch's ``register_forward_hook`` (module, args, output) would fail at the first call."""
    signature = signature_refusing(fn, 1)
    if signature is not None:
        name = getattr(fn, "__name__", type(fn).__name__)
        torch_style, fields = _TORCH_STYLE[kind]
        write = f"def {name}(call): ..." if name.isidentifier() else "lambda call: ..."
        raise TypeError(
            f"a hook function takes one HookCall, but {name}{signature} cannot be called with "
            f"one argument. torch's own {kind} hooks take {torch_style}; here they are "
            f"{fields}: write {write}")


def _refuse_compiled(model: nn.Module, paths: list[str]) -> None:
    """Hooks inside torch.compile'd or TorchScript code would silently never run: say so."""
    compiled: list[str] = []
    scripted: list[str] = []
    for path, module in every_path(model):  # a matched path may be a module's second one
        if is_compiled(module):
            compiled.append(path)
        elif isinstance(module, torch.jit.ScriptModule):
            scripted.append(path)
    for path in paths:
        for top in compiled:
            inner = f"{top}._orig_mod" if top else "_orig_mod"
            if path == inner or path.startswith(inner + "."):
                name = f"model.{top}" if top else "model"
                raise TypeError(
                    f"module '{path}' runs inside torch.compile'd code ({name} is an "
                    f"OptimizedModule): hooks on it are traced by TorchDynamo or never run. What "
                    f"works: hooks on '{top or '<the compiled module itself>'}' (they run "
                    f"eagerly around the compiled code). To see inside, hook and call the eager "
                    f"original {name}._orig_mod instead, e.g. tle.hooks({name}._orig_mod).")
        for top in scripted:
            if path == top or path.startswith(top + "." if top else ""):
                raise TypeError(
                    f"module '{path or '<model>'}' is TorchScript (torch.jit.script/trace): "
                    "TorchScript runs a compiled graph, so Python hooks on it or inside it do not "
                    "run (torch ignores them on submodules). Hook the eager nn.Module before "
                    "scripting it, and run that one while you look inside.")

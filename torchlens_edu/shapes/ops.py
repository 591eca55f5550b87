"""The op-level half of the shape tracer: every torch call in a forward, with the user's line.

A ``TorchFunctionMode`` sees functions (``F.softmax``), methods (``q.view``) and operators
(``q @ k``) alike. torch pops the mode while ``__torch_function__`` runs, so the calls made by an
op's own implementation are not seen again: one event per call the user's code made.

Speed matters here (the target is 2x a plain forward), so the per-call work is small: look up
a cached op name, keep the shapes as they are (``torch.Size``), and find the user's line in the
per-code-location cache of ``_core/sites.py`` (one dictionary lookup per frame walked). Names,
shapes and source text become words only when the trace is shown.

Calls made by the toolkit itself (a capture detaching what it keeps, a NaN watch's probes, a
memory estimate) are not the model's: they run through unrecorded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Protocol

import torch
from torch.overrides import TorchFunctionMode

from torchlens_edu._core.frames import is_user_file
from torchlens_edu._core.replay_state import replaying
from torchlens_edu._core.sites import Site, code_facts, user_site
from torchlens_edu.shapes.meta import keep_real, meet_on_meta, stays_real

# Calls that ask about a tensor instead of computing one: left out of the trace.
_NOISE = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
    "data_ptr", "element_size", "__len__", "__format__", "__repr__", "__hash__", "__iter__",
    "is_floating_point", "is_complex", "is_inference", "get_device", "has_names", "untyped_storage",
    "_is_view", "is_nonzero", "__reduce_ex__", "__deepcopy__", "__setstate__", "__array__",
})
# Attribute reads that make a new tensor (``x.T``); every other ``.shape``/``.device`` is noise.
_TENSOR_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag"})
# Python operators, shown as the learner wrote them.
_OPERATORS = {
    "__getitem__": "[]", "__setitem__": "[]=", "__matmul__": "@", "__rmatmul__": "@",
    "__add__": "+", "__radd__": "+", "__iadd__": "+=", "__sub__": "-", "__rsub__": "-",
    "__isub__": "-=", "__mul__": "*", "__rmul__": "*", "__imul__": "*=", "__truediv__": "/",
    "__rtruediv__": "/", "__itruediv__": "/=", "__floordiv__": "//", "__mod__": "%",
    "__pow__": "**", "__rpow__": "**", "__neg__": "-x", "__invert__": "~", "__and__": "&",
    "__or__": "|", "__xor__": "^", "__eq__": "==", "__ne__": "!=", "__lt__": "<",
    "__le__": "<=", "__gt__": ">", "__ge__": ">=", "__bool__": "bool",
}

# FSDP's module hooks, and what FSDP does in them
_FSDP_HOOKS = {"_pre_forward": "gathered the parameters of",
               "_post_forward": "finished the forward of"}


def fsdp_work(frame: FrameType | None) -> tuple[str, tuple[Any, ...]] | None:
    """What FSDP was doing when it called an op, or None when the user's code called it.

    FSDP's calls (all-gathers, copies into the gathered parameters, profiler markers, freeing
    them again) pass through ``torch/distributed/fsdp`` below the first user frame. Returns
    ``(what, modules)``: ``("gathered the parameters of", modules)`` in the pre-forward hook
    of the modules whose parameters it gathers, ``("finished the forward of", modules)`` in
    their post-forward hook (resharding, hooking the backward), ``("worked for", ())`` else.
    The tracer asks only when ``caller_site`` found FSDP's code there: the common op pays
    nothing for it.
    """
    by_fsdp = False
    while frame is not None:
        facts = code_facts(frame.f_code)
        if facts.fsdp:
            by_fsdp = True
            what = _FSDP_HOOKS.get(frame.f_code.co_name)
            if what is not None:
                return what, tuple(getattr(frame.f_locals.get("self"), "_modules", ()))
        elif facts.user:
            break
        frame = frame.f_back
    return ("worked for", ()) if by_fsdp else None


def op_name(func: Callable[..., Any]) -> str | None:
    """How an op is shown (``view``, ``@``, ``.T``), or None for noise such as ``.size()``."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # an attribute read: x.shape, x.device, x.T, ...
        attribute = getattr(getattr(func, "__self__", None), "__name__", "")
        return f".{attribute}" if attribute in _TENSOR_ATTRIBUTES else None
    if name in _NOISE:
        return None
    return _OPERATORS.get(name, name)


def tensors_in(args: Any, kwargs: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """The tensors among an op's arguments, one level into lists/tuples (``torch.cat([a, b])``)."""
    found: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, torch.Tensor))
    return found


def tensors_out(result: Any) -> list[torch.Tensor]:
    """The tensors an op returned: one, or a tuple of them (``split``, ``topk``)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        return [item for item in result if isinstance(item, torch.Tensor)]
    return []


class OpListener(Protocol):
    """Who hears about ops: the shape tracer (this module does not import it)."""

    ops: bool  # whether op events are recorded (else only counted: FLOPs of a meta run)
    meta: bool  # a shape-only run: real operands are moved to meta where they meet meta ones
    home: torch.device  # meta runs: where the weights were, for data the code sends to "meta"

    def op_done(self, name: str, args: Any, kwargs: dict[str, Any], result: Any,
                frame: Any) -> None: ...

    def op_failed(self, name: str, args: Any, kwargs: dict[str, Any], exc: Exception,
                  site: Site | None) -> None: ...


class OpRecorder(TorchFunctionMode):
    """Reports every non-noise torch call to the tracer; reports failures of every call.

    On exit it takes *itself* off torch's mode stack, wherever it is there (``TorchFunctionMode``
    pops the top one, which is another mode when blocks were closed out of order), and an exit
    without a matching enter does nothing instead of raising "pop from empty mode stack".

    >>> from torchlens_edu.shapes.tracer import trace_shapes
    >>> tr = trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4), ops=True)
    >>> [e.name for e in tr.events if e.kind == "op"]
    ['linear']
    """

    def __init__(self, tracer: OpListener) -> None:
        super().__init__()
        self._tracer = tracer
        # Models that look for op-level observers (the bundled GPT-2's attention) show their
        # explicit path only when ops are recorded: a shape-only run measures the real path.
        self.observes_ops = tracer.ops
        self._names: dict[Any, str | None] = {}
        self._meta = tracer.meta  # a meta run: real operands meet meta ones on meta

    def __exit__(self, *exc: Any) -> None:
        above = []  # modes pushed after this one and still there: they stay
        while torch._C._len_torch_function_stack():
            mode = torch._C._pop_torch_function_stack()
            if mode is self:
                break
            above.append(mode)
        for mode in reversed(above):
            torch._C._push_on_torch_function_stack(mode)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        if code_facts(caller.f_code).toolkit:  # another observer's own work, not the model's
            return func(*args, **kwargs)
        try:
            name = self._names[func]
        except KeyError:
            name = self._names[func] = op_name(func)
        except TypeError:  # an unhashable callable: name it every time
            name = op_name(func)
        if self._meta:
            if name is not None and stays_real(name):
                args, kwargs = keep_real(func, name, args, kwargs, self._tracer.home)
            moved = meet_on_meta(args, kwargs)
            if moved is not None:
                args, kwargs = moved
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            self._tracer.op_failed(name or str(getattr(func, "__name__", repr(func))), args, kwargs,
                                   exc, user_site(caller))
            raise
        if name is not None and not replaying():  # the NaN watch's re-run: already seen
            if torch._C._len_torch_function_stack():  # modes below this one (ours is off now):
                with torch._C.DisableTorchFunction():  # the tracer's size reads are not ops
                    self._tracer.op_done(name, args, kwargs, result, caller)
            else:
                self._tracer.op_done(name, args, kwargs, result, caller)
        return result


def end_at_user_line(exc: BaseException) -> None:
    """Cut ``exc``'s traceback after the user's line that called the failing op, when the failure
    passed through :class:`OpRecorder`: the last frame a learner sees is their ``x @ w``, not
    ``OpRecorder.__torch_function__`` (nor torch's dispatch to it).

    The traceback is the one the exception keeps propagating with (a ``with`` block re-raises
    ``exc`` with its ``__traceback__``), so this works from a context manager's ``__exit__``.
    """
    entries: list[TracebackType] = []
    tb = exc.__traceback__
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    recorder = OpRecorder.__torch_function__.__code__
    ours = next((i for i, e in enumerate(entries) if e.tb_frame.f_code is recorder), None)
    if ours is None:
        return
    users = [i for i in range(ours) if is_user_file(entries[i].tb_frame.f_code.co_filename)]
    if users:
        entries[users[-1]].tb_next = None

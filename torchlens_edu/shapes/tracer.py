"""Shape tracer: what shape is every activation, which line made it, and why did it break?

Module level (the default) uses forward hooks: one event per module call with its input and
output shapes, dtypes, parameter count and time. The hooks only record ``torch.Size`` objects;
names, text and trees are made later, when the trace is shown, so tracing costs almost nothing.

``ops=True`` adds every torch function, method and operator call (``q.view``, ``@``,
``F.softmax``) with the module it ran in and the user's source line. ``meta=True`` runs on meta
tensors: shapes, FLOPs and activation memory of any model size without touching the weights.

When the forward raises, the events up to the failure are kept (``exc.shape_trace``) and the
original exception is re-raised with an explanation added: the failing op, its operands' shapes
with named dimensions, the source line and what was expected.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from torchlens_edu._core.arguments import forward_keywords, require_flag
from torchlens_edu._core.interrupts import arm, disarm, uninterruptible, uninterruptible_enter
from torchlens_edu._core.model_state import kept_state, private_inputs
from torchlens_edu._core.modules import (
    Pattern,
    eager_original,
    every_path,
    is_hook_point,
    match_modules,
    module_aliases,
)
from torchlens_edu._core.replay_state import recomputing, replaying
from torchlens_edu._core.sites import Site, caller_site, user_site
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.dims import AxisRoles, Dims, dims_argument, model_parameter_axes
from torchlens_edu.printing.stats import padded_shape
from torchlens_edu.shapes import meta as _shape_meta
from torchlens_edu.shapes import ops as _shape_ops
from torchlens_edu.shapes.events import ShapeEvent, Spec
from torchlens_edu.shapes.explain import Failure, add_context, explain
from torchlens_edu.shapes.trace import ShapeTrace


def _spec(t: torch.Tensor) -> Spec:
    # a nested tensor (nn.TransformerEncoder's padding fast path) has no sizes: its padded shape
    return (t.shape if not t.is_nested else padded_shape(t)), t.dtype


def _specs(values: Any) -> tuple[Spec, ...]:
    return tuple([_spec(t) for t in values])  # a list: half a generator's cost


def _arg_specs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Spec, ...]:
    specs = []
    for arg in args:  # the common case, tensors passed directly, skips the tree walk
        if isinstance(arg, torch.Tensor):
            specs.append(_spec(arg))
        elif arg is not None and not isinstance(arg, (int, float, str)):
            specs.extend(_spec(t) for t in iter_tensors(arg))
    if kwargs:
        specs.extend(_spec(t) for t in iter_tensors(kwargs))
    return tuple(specs)


def _output_specs(output: Any, meta: bool) -> tuple[tuple[Spec, ...], int]:
    """A module output's specs, and in a meta run the bytes of its tensors (else 0)."""
    if isinstance(output, torch.Tensor):  # the common case skips the tree walk
        outs: list[torch.Tensor] = [output]
        specs: tuple[Spec, ...] = (_spec(output),)
    else:
        outs = list(iter_tensors(output))
        specs = _specs(outs)
    return specs, sum(t.numel() * t.element_size() for t in outs) if meta else 0


_Read = TypeVar("_Read", bound=Callable[..., Any])


def _unseen(read: _Read) -> _Read:
    """``read`` with torch functions off while a ``TorchFunctionMode`` is on (the op recorder's,
    or one of the user's): the tracer's own ``.shape`` reads are no op for a mode to see, and
    cost no dispatch (~8 us each through a Python mode, four per module call)."""
    def unseen(*args: Any) -> Any:
        if not torch._C._len_torch_function_stack():  # no mode: nothing to keep out
            return read(*args)
        with torch._C.DisableTorchFunction():
            return read(*args)
    return cast(_Read, unseen)


_read_inputs, _read_outputs = _unseen(_arg_specs), _unseen(_output_specs)
_infer_dims = _unseen(Dims.infer)


_NESTED_NOTE = ("nn.TransformerEncoder packed the padded batch into a nested tensor (its fast "
                "path for src_key_padding_mask in eval without gradients): inside it, shapes are "
                "padded shapes, and the padding is not computed")


def _fast_path_note(module: nn.Module, sees_ops: bool) -> str:
    """What to say when ``module`` would run as one fused kernel in a plain eval run without
    gradients, but runs step by step while traced, or "" when nothing.

    nn.TransformerEncoderLayer turns its fast path off when a hook is on it or inside it (the
    tracer's are); nn.MultiheadAttention only for an op trace (a TorchFunctionMode)."""
    name = type(module).__name__
    if isinstance(module, nn.TransformerEncoderLayer):
        return (f"{name}: in eval without gradients PyTorch runs it as one fused kernel when "
                "no hook is on it; traced, it runs step by step (the same math), as shown")
    if isinstance(module, nn.MultiheadAttention) and sees_ops:
        return (f"{name}: in eval without gradients PyTorch runs it as one fused kernel "
                "(torch._native_multi_head_attention); an op trace sees its step-by-step path "
                "(the same math)")
    return ""


def _fuses(module: nn.Module, args: tuple[Any, ...]) -> bool:
    """Whether PyTorch's own conditions for the fused path hold for this call (torch 2.x's
    ``why_not_sparsity_fast_path`` / ``why_not_fast_path``), grad mode and hooks aside."""
    attn = module.self_attn if isinstance(module, nn.TransformerEncoderLayer) else module
    if not isinstance(attn, nn.MultiheadAttention) or not args or \
            not isinstance(args[0], torch.Tensor):
        return False
    shared = (torch.backends.mha.get_fastpath_enabled() and not torch.is_autocast_enabled()
              and args[0].dim() == 3 and attn.batch_first and attn.num_heads % 2 == 0
              and attn.in_proj_bias is not None and attn._qkv_same_embed_dim)
    if isinstance(module, nn.TransformerEncoderLayer):
        return bool(shared and module.activation_relu_or_gelu
                    and module.norm1.eps == module.norm2.eps)
    return bool(shared and len(args) >= 3 and args[0] is args[1] is args[2]  # self-attention
                and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn)


def _param_counts(root: nn.Module) -> dict[str, int]:
    """Parameters under each module path, each tensor once per module (tied weights too); a
    lazy module's, not sized before its first forward, count 0."""
    counts: dict[str, int] = {}

    def visit(module: nn.Module, path: str) -> dict[int, int]:  # id -> numel, whole subtree
        tensors = {id(p): p.numel() for p in module._parameters.values()
                   if p is not None and not is_lazy(p)}
        for name, child in module._modules.items():
            if child is not None:
                tensors.update(visit(child, f"{path}.{name}" if path else name))
        counts[path] = sum(tensors.values())
        return tensors

    visit(root, "")
    return counts


@dataclass(slots=True, kw_only=True)
class _OpenCall:
    """A module call between its pre-hook and its post-hook."""

    path: str
    recorded: bool
    index: int  # its event if recorded, else the nearest recorded caller's (-1: none)
    started: float = 0.0  # perf_counter() when its forward began (recorded real runs)
    flops_before: int = 0  # FLOPs counted before it began (meta runs)
    args: Any = None  # what the pre-hook saw: a pre-hook that runs after ours may replace them
    kwargs: Any = None


class ShapeTracer:
    """Record shapes while a block runs; ``tracer.trace`` is the :class:`ShapeTrace`.

    Use :func:`trace_shapes` for one forward; use this to trace any code that calls the model
    (``generate``, a training step, several models). With ``discover=True`` a module called
    outside the given ones becomes a traced model too (how ``%trace_shapes`` finds models); a
    temporary global pre-hook spots it and is removed on exit. Only the forwards of the thread
    that made the tracer are recorded: other threads may run (or trace) the same model.

    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> with ShapeTracer(m) as tracer:
    ...     _ = m(torch.zeros(2, 4))
    >>> [e.path for e in tracer.trace.events]
    ['', '0', '1']
    """

    def __init__(self, models: nn.Module | Sequence[nn.Module] = (), *, ops: bool = False,
                 meta: bool = False, depth: int | None = None, include: Pattern | None = None,
                 dims: Mapping[str, int] | None = None, discover: bool = False) -> None:
        roots = [models] if isinstance(models, nn.Module) else list(models)
        for root in roots:
            if not isinstance(root, nn.Module):
                raise TypeError(f"trace_shapes needs an nn.Module, got {type(root).__name__}; "
                                "pass the model first: trace_shapes(model, inputs)")
        require_flag(ops, "ops", "trace_shapes")
        require_flag(meta, "meta", "trace_shapes")
        if depth is not None and (not isinstance(depth, int) or depth < 0):
            raise ValueError(f"depth={depth!r}: give a module depth >= 0 (the model is depth 0)")
        for root in roots:
            sharded = _shape_meta.sharding(root) if meta else ""
            if sharded:  # refused before anything is swapped: the model stays as it was
                raise ValueError(
                    f"meta=True cannot run a model sharded by {sharded}: a meta run swaps "
                    "the parameters, which FSDP/DTensor manage themselves. Trace it with real "
                    "tensors instead (meta=False, on every rank), or trace the model before "
                    "sharding it (before fully_shard / distribute_tensor)")
            lazy = [path for path, m in root.named_modules()
                    if isinstance(m, nn.modules.lazy.LazyModuleMixin)
                    and m.has_uninitialized_params()  # type: ignore[misc]  # (torch's stub)
                    ] if meta else []
            if lazy:  # their sizes come from the first real input: a meta run has none
                kinds = type(root.get_submodule(lazy[0])).__name__
                raise ValueError(
                    f"meta=True cannot run a model whose lazy modules never ran: {kinds} "
                    f"'{lazy[0]}'{f' and {len(lazy) - 1} more' if len(lazy) > 1 else ''} "
                    "learns its sizes from the first real forward. Run the model once on a "
                    "real input first (model(x)), or trace with meta=False")
            if not meta and any(p.is_meta for p in root.parameters()):
                raise ValueError("the model's weights are on the meta device (no values): trace "
                                 "it with meta=True, or load real weights first")
        if include is not None and roots and not any(
                match_modules(root, include, required=False) for root in roots):
            match_modules(roots[0], include)  # matches nothing: raises, with did-you-mean
        self._roots = _outermost(roots)
        self.ops, self.meta, self.depth, self.include = ops, meta, depth, include
        self._overrides = dims_argument(dims)
        self._discover = discover
        self._events: list[ShapeEvent] = []
        self._stack: list[_OpenCall] = []  # the module calls now running, innermost last
        self._calls: dict[str, int] = {}  # module path -> calls so far
        self._op_calls: dict[tuple[str, str], int] = {}  # (module path, op) -> calls so far
        self._hooked: set[int] = set()
        self._module_paths: dict[int, str] = {}  # id(module) -> its path (FSDP's ops name it)
        self._twins: dict[int, torch.Tensor] = {}  # meta runs: one twin per weight, all models
        self.home = torch.device("cpu")  # meta runs: the weights' device, for data kept real
        self._dims: Dims | None = None
        self._axes: dict[int, AxisRoles] = {}  # id(parameter) -> its axes' roles (op traces)
        self._exits = ExitStack()
        self._handles: list[RemovableHandle] = []  # module hooks: one list, removed last
        self._flops = 0  # FLOPs so far, counted per op in meta runs
        self._failure: Failure | None = None
        self._failing_module: tuple[BaseException, str] | None = None  # innermost, when raised
        self._pre_hooks: dict[int, Callable[..., Any]] = {}
        self._root_names: list[str] = []
        self._notes: dict[str, None] = {}  # PyTorch's fast paths this trace turned off, in order
        self._used = False
        self._thread = threading.get_ident()  # the forwards of this thread are traced

    # --- attaching -------------------------------------------------------------------------
    # Enter and exit are uninterruptible: a Ctrl-C waits until every hook, the op recorder and
    # the meta swap are all attached or all gone.

    @uninterruptible_enter
    def __enter__(self) -> ShapeTracer:
        if self._used:
            raise RuntimeError("a ShapeTracer records one block: make a new one for the next")
        self._used = True
        arm(self)
        self._exits.callback(disarm, self)
        self._exits.callback(self._remove_hooks)
        try:
            for root in self._roots:
                self._attach(root)
            if self._discover:
                self._exits.callback(nn.modules.module.register_module_forward_pre_hook(
                    self._discover_root).remove)
            if self.meta:  # code may enter autocast on its activations' device, "meta"
                self._exits.enter_context(_shape_meta.autocast_accepts_meta())
            # With ops, a model that looks for op-level observers (the bundled GPT-2's
            # attention) takes its explicit path: q, k, v, scores and att become visible ops.
            if self.ops or self.meta:  # meta runs need it: real inputs meet meta weights there
                self._exits.enter_context(_shape_ops.OpRecorder(self))
        except BaseException:
            self._exits.close()
            raise
        return self

    @uninterruptible
    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if isinstance(exc, Exception):
                self._explain(exc)
                _shape_ops.end_at_user_line(exc)
        finally:
            self._exits.close()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _attach(self, root: nn.Module) -> None:
        if id(root) in self._hooked:
            return
        if self.meta:
            if not self._twins:
                self.home = next((t.device for t in root.parameters() if not t.is_meta), self.home)
            # a shape-only run is no step: what its forward writes (a counter, a cache rebound
            # to a meta tensor) is put back with the real buffers
            self._exits.enter_context(kept_state(root, bits=False))
            self._exits.enter_context(_shape_meta.on_meta(root, self._twins))
        self._root_names.append(type(root).__name__)
        if self.ops or self.meta:  # weights are op operands: their modules name their axes
            for ident, roles in model_parameter_axes(root).items():  # meta: the twins' ids
                self._axes.setdefault(ident, roles)
        named = every_path(root)  # a module reachable under two paths comes twice: hooked once
        for path, module in named:  # FSDP's ops name a module by its first path
            self._module_paths.setdefault(id(module), path)
        selected = self._selected(root, named)
        counts = _param_counts(root)
        aliases = module_aliases(root)
        for first, module in named:
            if id(module) in self._hooked:
                continue
            self._hooked.add(id(module))
            paths = aliases.get(module, [first])
            # recorded under the path include named, else the first one selected (a module under
            # two parents is recorded once, under the path the user asked for)
            picked = [p for p in paths if p in selected]
            path = next((p for p in picked if selected[p]), picked[0] if picked else first)
            record = path in selected
            if not (record or self.ops or self.meta or module is root):
                continue  # nothing to record, no op needs to know it is inside this module,
                # and it is not the root (whose inputs name B and T, whatever is included)
            if is_hook_point(module) and not record:
                continue  # an identity with no ops inside; a hook would make it "observed"
            self._hook(module, path, record, counts.get(path, 0), is_root=module is root,
                       aliases=tuple(p for p in paths if p != path))

    def _selected(self, root: nn.Module, named: list[tuple[str, nn.Module]]) -> dict[str, bool]:
        """The paths to record -> whether ``include`` named them (not only a module above)."""
        # hook points (identities that only name a tensor) are shown when include names them
        points = {path for path, module in named if is_hook_point(module)}
        chosen = {path for path, _ in named} - points
        tops: set[str] = set()
        if self.include is not None:
            tops = {p for p, _ in match_modules(root, self.include, required=False)}
            chosen = {p for p in chosen
                      if any(not t or p == t or p.startswith(t + ".") for t in tops)}
            chosen |= points.intersection(tops)
        if self.depth is not None:
            depths = _call_depths(named)
            chosen = {p for p in chosen if depths[p] <= self.depth}
        return {p: p in tops for p in chosen}

    def _hook(self, module: nn.Module, path: str, record: bool, params: int, *,
              is_root: bool, aliases: tuple[str, ...] = ()) -> None:
        # The two closures below run at every module call: they only read sizes and clocks.
        name = type(module).__name__
        events, stack, calls = self._events, self._stack, self._calls
        meta, clock = self.meta, time.perf_counter
        frame = sys._getframe
        thread, this_thread = self._thread, threading.get_ident

        fused = _fast_path_note(module, self.ops or self.meta)

        def pre(mod: nn.Module, args: tuple[Any, ...], *rest: Any) -> Any:
            if this_thread() != thread:  # another thread's forward (or a kwargs hook that
                return None              # torch calls without kwargs while it registers it)
            (kwargs,) = rest
            if fused and not mod.training and not torch.is_grad_enabled() and _fuses(mod, args):
                self._notes[fused] = None
            if fused and args and isinstance(args[0], torch.Tensor) and args[0].is_nested:
                self._notes[_NESTED_NOTE] = None
            if is_root and self._dims is None:
                self._dims = _infer_dims(mod, [args, kwargs], self._overrides)
            parent = stack[-1].index if stack else -1
            if not record or replaying() or recomputing():  # the step again (the NaN watch's
                # replay, a checkpoint recomputing in backward): already recorded
                stack.append(_OpenCall(path=path, recorded=False, index=parent))
            else:
                call = calls.get(path, 0)
                calls[path] = call + 1
                events.append(ShapeEvent(
                    kind="module", path=path, name=name, call=call, parent=parent,
                    inputs=_read_inputs(args, kwargs), site=user_site(frame(1)), params=params,
                    aliases=aliases))
                stack.append(_OpenCall(path=path, recorded=True, index=len(events) - 1,
                                       started=clock(), flops_before=self._flops, args=args,
                                       kwargs=kwargs))
            return None

        def post(mod: nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
            if not stack or this_thread() != thread:  # (see pre: *rest)
                return
            kwargs, output = rest
            done = stack.pop()
            raised = sys.exc_info()[1] if output is None else None
            if raised is not None and (self._failing_module is None
                                       or self._failing_module[0] is not raised):
                self._failing_module = (raised, path)  # the innermost module that raised
            if not done.recorded:
                return
            event = events[done.index]
            if args is not done.args or kwargs is not done.kwargs:  # a later pre-hook (one
                event.inputs = _arg_specs(args, kwargs)  # added after ours) changed them
            if raised is not None:  # always_call: the forward raised inside this module
                event.failed = True  # no time, FLOPs or memory: the call never finished
                return
            event.outputs, memory = _read_outputs(output, meta)
            if meta:
                event.flops = self._flops - done.flops_before
                event.memory = memory
            else:
                event.seconds = clock() - done.started

        self._pre_hooks[id(module)] = pre
        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, always_call=True,
                                                          with_kwargs=True))

    @uninterruptible
    def _discover_root(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        """Global pre-hook: the first module called outside every traced model becomes a root
        (not a meta twin that another observer runs unseen)."""
        if (self._stack or id(module) in self._hooked or _shape_meta.is_twin_running()
                or threading.get_ident() != self._thread):
            return None
        self._roots.append(module)
        self._attach(module)  # in meta mode this also swaps its parameters for meta twins
        # This call's own pre-hooks were collected before we attached ours: run ours by hand.
        # (A global pre-hook sees no kwargs, so this first call records positional inputs only.)
        pre = self._pre_hooks.get(id(module))
        result = pre(module, args, {}) if pre is not None else None
        return result[0] if result is not None else None

    # --- called by the op recorder -------------------------------------------------------

    def records_ops(self) -> bool:
        """Whether an op running now belongs in the trace."""
        if not self.ops:
            return False
        if self._stack:
            return self._stack[-1].recorded
        return self.include is None and not recomputing()  # a checkpoint's function, again

    def op_done(self, name: str, args: Any, kwargs: dict[str, Any], result: Any,
                frame: Any) -> None:
        """An op returned (called by the op recorder, for every op but noise)."""
        record = self.records_ops()
        if not (record or self.meta):
            return
        ins, outs = _shape_ops.tensors_in(args, kwargs), _shape_ops.tensors_out(result)
        if any(is_lazy(t) for t in ins):  # a lazy module sizing its parameters: no shapes yet
            return
        flops = _shape_meta.op_flops(name, ins, outs) if self.meta else 0
        self._flops += flops
        if not record:
            return
        path, parent = self._where()
        site, by_fsdp = caller_site(frame)
        fsdp = _shape_ops.fsdp_work(frame) if by_fsdp else None
        if fsdp is not None:
            self._fsdp_op(name, *fsdp, parent)
            return
        key = (path, name)
        call = self._op_calls.get(key, 0)
        self._op_calls[key] = call + 1
        event = ShapeEvent(kind="op", path=path, name=name, call=call, parent=parent,
                           inputs=_specs(ins), outputs=_specs(outs), site=site,
                           in_ids=tuple(map(id, ins)), out_ids=tuple(map(id, outs)))
        if self.meta:
            event.flops = flops
            event.memory = _shape_meta.output_bytes(outs, ins)
        self._events.append(event)

    def _fsdp_op(self, name: str, what: str, modules: tuple[nn.Module, ...], parent: int
                 ) -> None:
        """FSDP's own op (gathering a module's parameters, freeing them): folded into one
        event per hook call, attributed to that module, with no user line (the user's forward
        call is not what ran it)."""
        paths = [self._module_paths.get(id(m), "") for m in modules]
        label = f"FSDP {what} {', '.join(p or 'the root' for p in paths) or 'the model'}"
        last = self._events[-1] if self._events else None
        if last is not None and last.folded and last.name == label and last.parent == parent:
            last.folded += (name,)
            return
        path = paths[0] if paths else ""
        call = self._op_calls.get((path, label), 0)
        self._op_calls[(path, label)] = call + 1
        self._events.append(ShapeEvent(kind="op", path=path, name=label, call=call,
                                       parent=parent, inputs=(), folded=(name,)))

    def op_failed(self, name: str, args: Any, kwargs: dict[str, Any], exc: Exception,
                  site: Site | None) -> None:
        if self._failure is not None and self._failure.exc is exc:
            return  # the same error passing up through an outer op
        ins = _shape_ops.tensors_in(args, kwargs)
        path, parent = self._where()
        equation = args[0] if name == "einsum" and args and isinstance(args[0], str) else ""
        self._failure = Failure(exc=exc, op=name, operands=ins, module=path, site=site,
                                equation=equation)
        if self.records_ops():
            call = self._op_calls.get((path, name), 0)
            self._events.append(ShapeEvent(kind="op", path=path, name=name, call=call,
                                           parent=parent, inputs=_specs(ins), site=site,
                                           failed=True, in_ids=tuple(map(id, ins))))

    def _where(self) -> tuple[str, int]:
        """The module an op runs in now and the event its events nest under."""
        if not self._stack:
            return "", -1
        top = self._stack[-1]
        return top.path, top.index

    # --- the result ------------------------------------------------------------------------

    @property
    def trace(self) -> ShapeTrace:
        """The events so far (also after a failure).

        >>> m = torch.nn.Linear(4, 2)
        >>> with ShapeTracer(m) as tracer:
        ...     _ = m(torch.zeros(3, 4))
        >>> len(tracer.trace)
        1
        """
        dims = self._dims or Dims.infer(self._roots[0] if self._roots else None, (),
                                        self._overrides)
        error = self._failure.explanation if self._failure is not None else ""
        return ShapeTrace(events=list(self._events), dims=dims, ops=self.ops, meta=self.meta,
                          error=error, roots=list(self._root_names), axes=self._axes,
                          notes=list(self._notes))

    def _explain(self, exc: Exception) -> None:
        failure = self._failure if self._failure is not None and self._failure.exc is exc else None
        if failure is None:
            module = self._failing_module
            if module is None or module[0] is not exc:
                return  # raised outside the model (a typo in the cell, say): not ours to explain
            failure = Failure(exc=exc, module=module[1])
        failure.meta = self.meta
        self._failure = failure
        failure.explanation = explain(failure, self.trace, self._roots)
        failure.operands = []  # drop the tensors: the trace keeps only their shapes
        add_context(exc, failure.explanation, self.trace)


def _call_depths(named: list[tuple[str, nn.Module]]) -> dict[str, int]:
    """How deep each module sits in the *calls*: containers that are never called
    (``ModuleList``, ``ModuleDict``) do not count, so ``transformer.h.0`` is depth 1."""
    containers = {path for path, m in named if isinstance(m, (nn.ModuleList, nn.ModuleDict))}
    depths = {}
    for path, _ in named:
        parts = path.split(".") if path else []
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        depths[path] = sum(1 for prefix in prefixes if prefix not in containers)
    return depths


def _outermost(models: list[nn.Module]) -> list[nn.Module]:
    """Drop models that are inside another one: the outer model's hooks already cover them."""
    if len(models) < 2:
        return models  # the usual one model: no walk
    inner = {id(sub) for m in models for sub in m.modules() if sub is not m}
    seen: set[int] = set()
    kept = []
    for m in models:
        if id(m) not in inner and id(m) not in seen:
            seen.add(id(m))
            kept.append(m)
    return kept


def trace_shapes(model: nn.Module, *inputs: Any, ops: bool = False, meta: bool = False,
                 depth: int | None = None, include: Pattern | None = None,
                 dims: Mapping[str, int] | None = None, **forward_kwargs: Any) -> ShapeTrace:
    """Run ``model(*inputs, **forward_kwargs)`` once and return the shapes it produced.

    - ``ops``: also every torch op, with its module and source line (the bundled GPT-2's
      attention takes its explicit path, so q, k, v, scores and weights appear).
    - ``meta``: shapes only, on meta tensors: no weight is read or copied; FLOPs and activation
      memory per event.
    - ``depth``: modules down to this call depth (the model is 0, GPT-2's blocks are 1;
      ``ModuleList``/``ModuleDict`` do not count); ``include``: module-path glob.
    - ``dims``: names for sizes, e.g. ``{"B": 2, "T": 16}`` (more come from the config).

    A ``torch.compile``'d model is traced through its eager original (``model._orig_mod``):
    the same modules and ops, with paths relative to it.

    When the forward raises, the original exception is re-raised with an explanation, and the
    trace up to the failure is ``exc.shape_trace``.

    >>> from torchlens_edu.models import GPT2, GPT2Config
    >>> m = GPT2(GPT2Config.preset("tiny")).eval()
    >>> tr = trace_shapes(m, torch.zeros(2, 8, dtype=torch.long), depth=2)
    >>> tr.modules("transformer.wte")[0].output_shapes
    [(2, 8, 32)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_shapes needs an nn.Module first, got {type(model).__name__}: "
                        "trace_shapes(model, *inputs)")
    # torch.compile'd: its eager original runs the same modules and ops, where TorchDynamo
    # would compile the tracer's hooks into the graph (graph breaks, recompiles)
    eager = eager_original(model)
    forward_keywords(eager, forward_kwargs, ("ops", "meta", "depth", "include", "dims"),
                     "trace_shapes")
    # the forward is ours, not a step of the user's: running statistics, caches, counters and
    # the random stream stay as they were (a meta run's tracer keeps them itself)
    with kept_state(eager, bits=not meta), ShapeTracer(
            eager, ops=ops, meta=meta, depth=depth, include=include, dims=dims) as tracer:
        if eager is not model:
            tracer._root_names[0] += " (model._orig_mod, the eager model torch.compile wraps)"
        args, kwargs = private_inputs(inputs, forward_kwargs)  # the user's KV cache stays
        eager(*args, **kwargs)
    return tracer.trace


__all__ = ["ShapeTracer", "trace_shapes"]

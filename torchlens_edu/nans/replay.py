"""The precise tier of the NaN/Inf watch: replay the failing step and find the producing op.

The cheap tier only knows *that* a module boundary saw a NaN/Inf. Here we replay that step's
forward with the same inputs and the same random state (dropout masks come out identical), under a
``TorchFunctionMode`` that sees every torch call, functional glue between modules included:

- forward: the producer is the first call whose inputs were finite (or only intentionally
  non-finite) and whose output was not. Each non-finite tensor carries the producer it came from,
  so a NaN that a ``torch.where`` later masks out does not hide the one that reached a module
  boundary. ``-inf`` written on purpose (``masked_fill(mask, -inf)``, ``torch.full(..., -inf)``)
  is *allowed*: ops that merely carry it along are fine, an op that turns it into a new kind (a
  softmax over a fully masked row makes NaN) is the producer.
- backward: the replayed forward records which user line created each autograd node; a backward
  from the gradients that reached the model's outputs then runs with node hooks, and the producer
  is the first node whose incoming gradients were finite and outgoing were not.

The replay runs on the model's own parameters without changing them: no gradients are
accumulated (``torch.autograd.grad``), buffers are restored, and the random state is put back.
User hooks run again (a hook may change what the step computes); ``tle.replaying()`` is True
meanwhile, so that hooks with side effects, and the toolkit's own observers, can skip it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from torchlens_edu._core.frames import frame_location, user_frame
from torchlens_edu._core.model_state import kept_state, private_inputs, set_rng
from torchlens_edu._core.modules import module_paths
from torchlens_edu._core.replay_state import replay_scope
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.dims import AxisRoles, model_parameter_axes
from torchlens_edu.nans.backward import Creation, GraphWatch
from torchlens_edu.nans.causes import forward_cause, hint_for, row_facts
from torchlens_edu.nans.ranks import rank
from torchlens_edu.nans.report import Found, Kind, Producer, TensorSummary, bad_kinds, kind_of

# ops that only move or view data: they pass non-finite values along, they never make them
_MOVES = frozenset({
    "__getitem__", "__setitem__", "view", "view_as", "reshape", "reshape_as", "transpose", "t",
    "permute", "contiguous", "clone", "split", "split_with_sizes", "tensor_split", "chunk",
    "unbind", "cat", "concat", "concatenate", "stack", "expand", "expand_as", "to", "detach",
    "flatten", "unflatten", "squeeze", "unsqueeze", "narrow", "select", "index_select",
    "gather", "repeat", "tile", "roll", "flip", "movedim", "swapaxes", "copy_", "masked_select",
    "float", "double", "type", "type_as", "cpu", "cuda", "requires_grad_", "dropout", "tril",
    "triu", "diagonal", "as_strided"})
# factories whose output is uninitialised memory: judged when it is read, not when made
_UNINITIALISED = frozenset({"empty", "empty_like", "new_empty", "empty_strided"})
_DISTRIBUTED = f"{os.sep}torch{os.sep}distributed{os.sep}"
_REVERSED = {"__rdiv__": "div", "__rtruediv__": "div", "__rsub__": "sub", "__rpow__": "pow",
             "__rmatmul__": "matmul", "__radd__": "add", "__rmul__": "mul"}


class Stopped(Exception):  # control flow: the replay stopped at the producer
    """Raised inside the replay at the producing call; its traceback ends in the user's frame."""

    def __init__(self, frame: FrameType | None) -> None:
        super().__init__("stopped at the producing call")
        self.frame = frame


@dataclass(frozen=True, kw_only=True)
class _State:
    """What we know of a tensor's non-finite values: none, intended, or from a producer."""

    kinds: frozenset[Kind] = frozenset()
    allowed: bool = False  # intentional (-inf masks)
    origin: Producer | None = None  # tainted: made by this producer
    label: str = ""  # non-finite already when first seen (a parameter, buffer, input)


_CLEAN = _State()


def _floats(obj: Any) -> list[torch.Tensor]:
    return [t for t in iter_tensors(obj) if t.is_floating_point() or t.is_complex()]


def _scalar_kinds(obj: Any) -> set[Kind]:
    """Non-finite Python numbers among the arguments (``masked_fill(m, float("-inf"))``)."""
    found: set[Kind] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if math.isnan(item):
                found.add("nan")
            elif math.isinf(item):
                found.add("+inf" if item > 0 else "-inf")
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


@dataclass(kw_only=True)
class ReplayInputs:
    """Everything needed to run one step's forward again, identically."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: list[torch.Tensor] | None
    out_grads: dict[int, torch.Tensor] = field(default_factory=dict)



class Replayer(TorchFunctionMode):
    """Runs a recorded step again under observation; see the module docstring.

    ``watched`` is the model the user gave (its module paths name things); ``target`` is what we
    call (the same model, or the module inside a DistributedDataParallel wrapper, whose forward
    would start collectives on this rank alone).
    """

    def __init__(self, watched: nn.Module, target: nn.Module, kinds: frozenset[Kind],
                 dims: Mapping[str, int] | None) -> None:
        super().__init__()
        self.watched, self.target, self.kinds, self.dims = watched, target, kinds, dims
        self.allowed_modules: set[str] = set()
        self.finish = False  # run a replay to its end (see _found)
        self.shards: dict[str, torch.Tensor] = {}
        self.first: Producer | None = None
        self.on_stop: Callable[[FrameType | None], None] | None = None
        self._reset(track=False, record=False, stop_at=None)

    # Names are needed only when a replay runs (something went bad): built then, not on every
    # ``watch_nans`` entry, which stays cheap enough to wrap each training step.
    @functools.cached_property
    def paths(self) -> dict[nn.Module, str]:
        return module_paths(self.watched)

    @functools.cached_property
    def labels(self) -> dict[int, str]:
        labels = {id(p): f"parameter {name}" for name, p in self.watched.named_parameters()}
        labels.update((id(b), f"buffer {name}") for name, b in self.watched.named_buffers())
        return labels

    @functools.cached_property
    def axes(self) -> dict[int, AxisRoles]:
        """What each weight's axes are, from its module: ``wpe.weight`` is ``(ctx, C)``."""
        return model_parameter_axes(self.watched)

    def _reset(self, *, track: bool, record: bool, stop_at: int | None) -> None:
        self.track, self.record, self.stop_at = track, record, stop_at
        self.count = 0
        self.busy = False
        self.stack: list[str] = []
        self.calls: list[int] = []  # per stack entry: the how-manieth call of that module
        self.counts: dict[str, int] = {}  # module path -> calls so far in this replay
        self.states: dict[int, tuple[weakref.ref, int, _State]] = {}
        self.nodes: dict[Any, Creation] = {}

    # ---------------------------------------------------------------- the three replays
    def forward(self, step: ReplayInputs) -> Producer | None:
        """The producer of the first non-finite value that reached a module boundary."""
        self._reset(track=True, record=False, stop_at=None)
        # sharded parameters (DTensors) as they are between forwards, before FSDP gathers them
        self.shards = {name: p for name, p in self.watched.named_parameters()
                       if isinstance(getattr(p, "_local_tensor", None), torch.Tensor)}
        for i, t in enumerate(_floats((step.args, step.kwargs))):
            kinds = bad_kinds(t, self.kinds)
            # an additive attention mask comes in holding -inf on purpose
            state = _State(kinds=kinds, allowed=kinds <= {"-inf"}, label=f"model input {i}")
            self.states[id(t)] = (weakref.ref(t), t._version, state if kinds else _CLEAN)
        self.first = None
        try:
            with self._replaying(step, grad=False):
                self._run(step)
        except Found as found:
            return found.producer
        return self.first

    def stop_at_call(self, step: ReplayInputs, index: int) -> Stopped | None:
        """Replay until call ``index`` and stop there (``on_stop`` runs in the user's frame)."""
        self._reset(track=False, record=False, stop_at=index)
        try:
            with self._replaying(step, grad=False):
                self._run(step)
        except Stopped as stopped:
            return stopped
        return None

    def backward(self, step: ReplayInputs) -> Producer | None:
        """The first autograd node whose incoming gradients are finite and outgoing are not.

        With ``finish`` (FSDP) the backward runs to its end whatever it finds: every rank
        replays it together, and each module's parameter gather and gradient reduce-scatter
        needs all of them.
        """
        self._reset(track=False, record=True, stop_at=None)
        self.first = None
        try:
            with self._replaying(step, grad=True), self._grads_kept():
                self._replay_backward(step)
        except Found as found:
            return found.producer
        return self.first

    def _replay_backward(self, step: ReplayInputs) -> None:
        out = self._run(step)
        roots, grads = [], []
        for i, t in enumerate(_floats(out)):
            if i in step.out_grads and t.grad_fn is not None:
                roots.append(t)
                grads.append(step.out_grads[i])
        if not roots:
            return
        if any(bad_kinds(g, self.kinds) for g in grads):
            summaries = [TensorSummary.of(f"grad of output {i}", g, self.dims)
                         for i, g in enumerate(grads)]
            self._found(Producer(
                phase="backward", index=-1, op="", module="", source="", cause="loss",
                hint=hint_for("loss", "the gradient that reached the model's outputs was "
                              "already non-finite: the code after the model (the loss) made it"),
                outputs=summaries))
        leaves = GraphWatch(self.nodes, self.kinds, self.dims, self._module_params,
                            self._quiet, self._found).hook_graph(roots)
        if leaves:
            # autograd.grad: gradients are returned, never accumulated into .grad
            torch.autograd.grad(roots, leaves, grads, allow_unused=True)

    # ---------------------------------------------------------------- replay plumbing
    @contextmanager
    def _replaying(self, step: ReplayInputs, *, grad: bool) -> Iterator[None]:
        """Same random state as the recorded step; everything it changes put back after."""
        # buffers, attributes (a step counter, a rebound cache) and the random state
        with kept_state(self.target):
            set_rng((step.rng_cpu, step.rng_cuda))
            # tle.replaying() is True inside: hooks with side effects and our observers skip it
            with replay_scope(backward=grad), torch.set_grad_enabled(grad):
                yield

    def _run(self, step: ReplayInputs) -> Any:
        """The target's forward with every torch call and module boundary observed."""
        handles = []
        for module in self.target.modules():
            path = self.paths.get(module, "")
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, path=path: self._enter(path)))
            handles.append(module.register_forward_hook(self._after_module, always_call=True))
        try:
            with self:
                args, kwargs = private_inputs(step.args, step.kwargs)
                return self.target(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _grads_kept(self) -> Iterator[None]:
        """The parameters' ``.grad`` as they were: FSDP's post-backward writes the sharded
        parameters' gradients itself (a reduce-scatter of zeros for unused parameters), not
        through autograd, so a replayed backward could change them."""
        params = list(self.watched.parameters())
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in zip(params, kept, strict=True):
                p.grad = grad

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Our own tensor math (checks, statistics) is not part of the replayed step."""
        busy, self.busy = self.busy, True
        try:
            yield
        finally:
            self.busy = busy

    def _enter(self, path: str) -> None:
        self.stack.append(path)
        self.calls.append(self.counts.get(path, 0))  # a shared layer: which application
        self.counts[path] = self.calls[-1] + 1

    def _after_module(self, module: nn.Module, args: Any, output: Any) -> None:
        path = self.stack.pop() if self.stack else ""
        if self.calls:
            self.calls.pop()
        if not self.track or self.busy:
            return
        with self._quiet():
            self._check_boundary(path, output)

    def _check_boundary(self, path: str, output: Any) -> None:
        for t in _floats(output):
            state = self._state(t)
            if state.origin is not None:
                self._found(state.origin)
            elif state.label and not state.allowed:  # e.g. a module returning its parameter
                self._found(self._forward_producer(
                    self.count, "", [], [t], [(t, state)], path=path))
            elif state.kinds:
                self.allowed_modules.add(path)

    def _found(self, producer: Producer) -> None:
        """Stop at the producer; or, where the step runs collectives (FSDP gathers each
        module's parameters, and reduce-scatters their gradients), note the first and run on,
        so that every rank's replay enters the same collectives."""
        if not self.finish:
            raise Found(producer)
        if self.first is None:
            self.first = producer

    def _state(self, t: torch.Tensor) -> _State:
        entry = self.states.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return entry[2]
        kinds = bad_kinds(t, self.kinds)
        label = self.labels.get(id(t)) or self._live_label(t)
        state = _State(kinds=kinds, label=label) if kinds else _CLEAN
        self._set(t, state)
        return state

    def _shard_note(self, label: str) -> str:
        """Under FSDP every rank gathers the whole parameter: say whose shard holds the bad
        values (this rank's, or another's), read from this rank's shard alone."""
        sharded = self.shards.get(label.removeprefix("parameter "))
        if sharded is None:
            return ""
        here = rank()
        if bad_kinds(sharded, self.kinds):
            return f"; it is in this rank's shard (rank {here})"
        return f"; this rank's shard (rank {here}) is finite: another rank's shard holds it"

    def _live_label(self, t: torch.Tensor) -> str:
        """A parameter registered only now (FSDP puts the gathered, unsharded parameters in
        the modules during their forward), else a tensor made outside torch calls."""
        for name, p in self.watched.named_parameters():
            if p is t:
                return f"parameter {name}"
        return "a tensor made outside torch calls"

    def _set(self, t: torch.Tensor, state: _State) -> None:
        self.states[id(t)] = (weakref.ref(t), t._version, state)

    # ---------------------------------------------------------------- every torch call
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.busy or not name or name in ("__get__", "__set__"):  # .shape, .grad, ...
            return func(*args, **kwargs)
        if _DISTRIBUTED in sys._getframe(1).f_code.co_filename:
            # FSDP's own calls (gathering parameters into buffers it frees again): not the
            # user's ops, and their tensors may have no storage to read
            return func(*args, **kwargs)
        index = self.count
        self.count += 1
        if index == self.stop_at:
            frame = user_frame(sys._getframe(1))
            if self.on_stop is not None:
                self.on_stop(frame)
            raise Stopped(frame)
        if not (self.track or self.record):
            return func(*args, **kwargs)
        inputs = _floats((args, kwargs))
        before = [self._state(t) for t in inputs] if self.track else []
        in_place = name.endswith("_") or name.startswith("__i") or name == "__setitem__"
        snapshot = [t.detach().clone() for t in inputs[:1]] if in_place and self.track else []
        out = func(*args, **kwargs)
        outputs = _floats(args[0] if name == "__setitem__" else out)
        if self.record:
            self._record(index, name, outputs, inputs)
        if self.track and outputs:
            with self._quiet():
                self._track(index, name, args, kwargs, snapshot + inputs[len(snapshot):],
                            before, outputs)
        return out

    def _record(self, index: int, name: str, outputs: list[torch.Tensor],
                inputs: list[torch.Tensor]) -> None:
        source = ""
        for t in outputs:
            node = t.grad_fn
            if node is not None and node not in self.nodes:
                source = source or frame_location(user_frame(sys._getframe(1)))
                module = self.stack[-1] if self.stack else ""
                self.nodes[node] = Creation(index=index, op=_display(name), module=module,
                                            source=source, inputs=tuple(inputs))

    def _track(self, index: int, name: str, args: tuple, kwargs: dict,
               inputs: list[torch.Tensor], before: list[_State],
               outputs: list[torch.Tensor]) -> None:
        if name in _UNINITIALISED:
            return  # judged when read
        out_kinds = [bad_kinds(t, self.kinds) for t in outputs]
        made = frozenset().union(*out_kinds)
        if not made:
            for t in outputs:
                self._set(t, _CLEAN)
            return
        origins = [s.origin for s in before if s.origin is not None]
        foreign = [(t, s) for t, s in zip(inputs, before, strict=True)
                   if s.label and not s.allowed]
        allowed = set(_scalar_kinds((args, kwargs)))
        for s in before:
            if s.allowed:
                allowed |= s.kinds
        if origins:
            state = _State(kinds=made, origin=min(origins, key=lambda p: p.index))
        elif name in _MOVES and foreign:  # carried along, not made: judged where it is used
            state = _State(kinds=made, label=foreign[0][1].label)
        elif not foreign and made <= allowed:
            state = _State(kinds=made, allowed=True)
        else:
            state = _State(kinds=made, origin=self._forward_producer(
                index, name, inputs, outputs, foreign,
                masked=any(s.allowed and "-inf" in s.kinds for s in before),
                call=(args, kwargs)))
        for t, kinds in zip(outputs, out_kinds, strict=True):
            self._set(t, state if kinds else _CLEAN)

    def _forward_producer(self, index: int, name: str, inputs: list[torch.Tensor],
                          outputs: list[torch.Tensor], foreign: list[tuple[torch.Tensor, _State]],
                          *, masked: bool = False, path: str | None = None,
                          call: tuple[tuple, dict] = ((), {})) -> Producer:
        module = path if path is not None else (self.stack[-1] if self.stack else "")
        source = frame_location(user_frame(sys._getframe(1)))
        ins = [TensorSummary.of(self.labels.get(id(t), f"input {i}"), t, self.dims,
                                self.axes.get(id(t))) for i, t in enumerate(inputs)]
        outs = [TensorSummary.of(f"output {i}", t, self.dims) for i, t in enumerate(outputs)]
        if foreign:
            label = foreign[0][1].label
            what = "parameter" if label.startswith("parameter") else "value"
            cause, hint = "exploding", hint_for("exploding", (
                f"{label} already held {kind_of(ins)} before {_display(name) or module!r} used "
                f"it: an earlier step wrote it (an optimizer step with too large a learning "
                f"rate or without gradient clipping, or a bad checkpoint); this {what} was not "
                "made non-finite in this forward" + self._shard_note(label)))
        else:
            op = _display(name)
            cause, detail = forward_cause(op, ins, outs, masked, row_facts(op, *call))
            hint = hint_for(cause, detail)
        named = {s.name for s in ins}
        params = [s for s in self._module_params(module) if f"parameter {s.name}" not in named]
        nth = self.calls[-1] if path is None and self.calls else 0
        return Producer(phase="forward", index=index, op=_display(name), module=module,
                        source=source, cause=cause, hint=hint, inputs=ins, outputs=outs,
                        params=params, call=nth)

    def _module_params(self, path: str) -> list[TensorSummary]:
        module = dict(self.watched.named_modules()).get(path)
        if module is None:
            return []
        prefix = f"{path}." if path else ""
        return [TensorSummary.of(prefix + n, p, self.dims, self.axes.get(id(p)))
                for n, p in module.named_parameters(recurse=False)]

    # ---------------------------------------------------------------- backward hooks
def _display(name: str) -> str:
    """``__rdiv__`` -> ``div``, ``__iadd__`` -> ``add_``; plain names stay as they are."""
    if name in _REVERSED:
        return _REVERSED[name]
    if name.startswith("__i") and name.endswith("__"):
        return name[3:-2] + "_"
    if name.startswith("__") and name.endswith("__"):
        return name[2:-2]
    return name

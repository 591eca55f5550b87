"""Run the model and the reference on the same inputs and find the first divergence.

Module level first: forward hooks record every module call's inputs and outputs (copies),
under the same RNG state on both sides (``fork_rng`` + ``manual_seed``, so the user's own RNG
stream is left as it was). The first aligned module, in the order modules *finish*, whose
output differs beyond the tolerance is where the difference shows; walking up to the
innermost enclosing call whose inputs still agreed gives the module whose own code made it.
Then, inside that call only, the op-level pass (ops.py) names the op and the line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torchlens_edu._core.arguments import require_flag
from torchlens_edu._core.model_state import kept_state, private_inputs
from torchlens_edu._core.modules import eager_original, is_compiled
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.dims import Dims, _config_of, dims_from_config
from torchlens_edu.divergence.align import Alignment, ModuleCall, PathMap, align, map_argument
from torchlens_edu.divergence.backward import blame_backward
from torchlens_edu.divergence.blame import OpBlame, blame, worst_difference
from torchlens_edu.divergence.loss import Loss, choose_loss
from torchlens_edu.divergence.ops import record_ops
from torchlens_edu.divergence.result import Comparison, Divergence, Drift
from torchlens_edu.divergence.steps import expand_both
from torchlens_edu.divergence.tolerance import TensorDiff, Tolerance, measure
from torchlens_edu.divergence.weights import transposes

_SEED = 0


@dataclass(kw_only=True)
class _Recording:
    calls: list[ModuleCall]
    live: list[list[torch.Tensor]]  # backward runs: each call's outputs, still in the graph
    output: Any


def _copies(value: Any) -> list[torch.Tensor]:
    # a nested tensor (nn.TransformerEncoder's padding fast path) has no sizes: compared padded
    return [(t.to_padded_tensor(0.0) if t.is_nested else t).detach().clone()
            for t in iter_tensors(value)]


def _seeded(model: nn.Module, forward: Callable[[], Any]) -> Any:
    """``forward()`` from the same RNG state every time; the caller's RNG state is restored."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        return forward()


def _record(model: nn.Module, forward: Callable[[], Any], *, keep_graph: bool) -> _Recording:
    calls: list[ModuleCall] = []
    live: list[list[torch.Tensor]] = []
    stack: list[int] = []
    counts: dict[str, int] = {}
    finished = 0

    def make_hooks(path: str) -> tuple[Callable[..., None], Callable[..., None]]:
        def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
            calls.append(ModuleCall(path=path, index=counts.get(path, 0),
                                    parent=stack[-1] if stack else None,
                                    inputs=_copies((args, kwargs)), outputs=[]))
            live.append([])
            counts[path] = counts.get(path, 0) + 1
            stack.append(len(calls) - 1)

        def leave(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            nonlocal finished
            if not stack or calls[stack[-1]].path != path:
                return  # the forward failed before this call began (always_call)
            position = stack.pop()
            call = calls[position]
            call.outputs = _copies(output)
            call.finished = finished
            finished += 1
            if keep_graph:
                live[position] = [t for t in iter_tensors(output) if t.requires_grad]
        return enter, leave

    with ExitStack() as hooks:
        for path, module in model.named_modules():
            enter, leave = make_hooks(path)
            hooks.callback(module.register_forward_pre_hook(enter, with_kwargs=True).remove)
            hooks.callback(module.register_forward_hook(leave, with_kwargs=True,
                                                        always_call=True).remove)
        with torch.set_grad_enabled(keep_graph):
            output = _seeded(model, forward)
    return _Recording(calls=calls, live=live, output=output)


def _outputs_of(calls: Sequence[ModuleCall], alignment: Alignment, position: int
                ) -> list[torch.Tensor]:
    parts = alignment.parts.get(position)
    if parts is None:
        return calls[position].outputs
    return [torch.cat([calls[p].outputs[0] for p in parts], dim=-1)]  # a split fused projection


def _agree(values: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
           tolerance: Tolerance) -> bool:
    diff = worst_difference(values, references, tolerance)
    return diff is None or not diff.differs


def compare(model: nn.Module, reference: nn.Module, *inputs: Any, rtol: float | None = None,
            atol: float | None = None, backward: bool = False,
            map: PathMap | None = None) -> Comparison:
    """Run ``model`` and ``reference`` on ``inputs`` and name the first place they differ.

    The modules are aligned by ``map`` (reference glob -> model glob), by path, or by structure;
    the first differing module is searched for the op and line that made the difference. The
    models are run as they are (train/eval mode untouched); ``backward=True`` also compares
    the gradients of a fixed random projection of the output.

    >>> import torch.nn as nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> ref = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1))
    >>> mine = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0))
    >>> mine.load_state_dict(ref.state_dict())
    <All keys matched successfully>
    >>> first = compare(mine, ref, torch.randn(3, 4)).first
    >>> first.module, first.op
    ('1', 'softmax')
    """
    if not isinstance(model, nn.Module) or not isinstance(reference, nn.Module):
        raise TypeError("compare(model, reference, *inputs): both models must be nn.Modules, "
                        f"got {type(model).__name__} and {type(reference).__name__}")
    require_flag(backward, "backward", "compare")
    map = map_argument(map, "compare")
    # a torch.compile'd side runs its eager original: the same modules and weights, without
    # TorchDynamo compiling the observers' hooks (the same forward, graph breaks aside)
    compiled = [name for name, side in (("model", model), ("reference", reference))
                if is_compiled(side)]
    model, reference = eager_original(model), eager_original(reference)
    # the forwards are ours: running statistics, caches, counters and the random stream of
    # both models stay as they were
    with kept_state(model, reference):
        result = _compare(model, reference, inputs, Tolerance(rtol=rtol, atol=atol), backward,
                          map, rtol, atol)
    return dataclasses.replace(result, notes=[
        *result.notes, *(f"the {name} is torch.compile'd: its eager original ({name}._orig_mod) "
                         "was compared, the same modules and weights" for name in compiled)])


def _compare(model: nn.Module, reference: nn.Module, inputs: tuple[Any, ...],
             tolerance: Tolerance, backward: bool, map: PathMap | None, rtol: float | None,
             atol: float | None) -> Comparison:
    # each run its own copy of a stateful input (a KV cache the forward appends to)
    mine = _record(model, lambda: model(*private_inputs(inputs)[0]), keep_graph=backward)
    theirs = _record(reference, lambda: reference(*private_inputs(inputs)[0]),
                     keep_graph=backward)
    alignment = align(mine.calls, theirs.calls, map)
    rows: list[Drift] = []
    first_position: int | None = None
    first_diff: TensorDiff | None = None
    notes: list[str] = []
    for position in sorted(alignment.pairs, key=lambda p: mine.calls[p].finished):
        ref = theirs.calls[alignment.pairs[position]]
        outputs = _outputs_of(mine.calls, alignment, position)
        diff = worst_difference(outputs, ref.outputs, tolerance)
        if diff is None:
            continue
        rows.append(Drift(module=mine.calls[position].path, reference_module=ref.path,
                          max_abs=diff.max_abs, max_rel=diff.max_rel, status=diff.status))
        if diff.differs and first_position is None:
            first_position, first_diff = position, diff
    _check_outputs(mine.output, theirs.output)
    first = None
    if first_position is not None and first_diff is not None:
        first = _locate(model, reference, inputs, mine.calls, theirs.calls, alignment,
                        first_position, first_diff, tolerance)
    gradients: list[Drift] = []
    loss: str | None = None
    if backward:
        gradients, gradient_first, loss = _compare_gradients(model, reference, inputs, mine,
                                                             theirs, alignment, tolerance)
        notes += _untied(model, reference)
        first = first or gradient_first
    for name, side in (("model", model), ("reference", reference)):
        if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in side.modules()):
            notes.append(f"the {name} is in training mode with active dropout: both ran from "
                         f"the same seed, but call .eval() to compare without it")
    dims = Dims.infer(model, inputs)
    if _config_of(model) is None:  # a learner's model without a config: the reference's
        dims = dims.merged({name: size for name, size in
                            dims_from_config(_config_of(reference)).items() if name not in dims})
    return Comparison(first=first, alignment=alignment.how, aligned_modules=len(alignment.pairs),
                      modules=rows, gradients=gradients, rtol=rtol, atol=atol, notes=notes,
                      dims=dict(dims), loss=loss)


def _check_outputs(output: Any, reference_output: Any) -> None:
    """Both sides must return at least one tensor, or there is nothing to compare."""
    for name, value in (("model", output), ("reference", reference_output)):
        if not any(True for _ in iter_tensors(value)):
            raise ValueError(f"the outputs cannot be aligned: the {name} returned "
                             f"{type(value).__name__}, with no tensor in it; compare needs "
                             f"models that return tensors (logits, a tuple, a ModelOutput)")


def _locate(model: nn.Module, reference: nn.Module, inputs: tuple[Any, ...],
            calls: list[ModuleCall], references: list[ModuleCall], alignment: Alignment,
            position: int, diff: TensorDiff, tolerance: Tolerance) -> Divergence:
    """Walk up to the innermost aligned call whose inputs agreed, then blame an op inside."""
    blamed = position
    while True:
        ref = references[alignment.pairs[blamed]]
        if _agree(calls[blamed].inputs, ref.inputs, tolerance):
            break
        parent = calls[blamed].parent
        while parent is not None and parent not in alignment.pairs:
            parent = calls[parent].parent
        if parent is None:
            break
        blamed = parent
    call, ref = calls[blamed], references[alignment.pairs[blamed]]
    inputs_differed = not _agree(call.inputs, ref.inputs, tolerance)
    found: OpBlame | None = None
    if not inputs_differed and blamed not in alignment.parts:
        ops, returned, _ = record_ops(
            model, lambda: _seeded(model, lambda: _no_grad(model, inputs)), call.key)
        ref_ops, _, _ = record_ops(
            reference, lambda: _seeded(reference, lambda: _no_grad(reference, inputs)), ref.key)
        # a fused op that only one side calls is compared in its steps (steps.py)
        ops, ref_ops, moved = expand_both(ops, ref_ops)
        returned = [None if made is None else (moved[made[0]], made[1]) for made in returned]
        found = blame(ops, returned, ref_ops, tolerance)
    shown = (found.diff if found is not None and found.diff is not None else
             worst_difference(_outputs_of(calls, alignment, blamed), ref.outputs, tolerance)
             or diff)
    if found is None:
        return _divergence(shown, kind="shape" if shown.status == "shape" else "module",
                           module=call.path, reference_module=ref.path,
                           inputs_differed=inputs_differed,
                           detail=f"the output of `{call.path or 'the model'}` differs; no "
                                  f"single op inside it could be blamed")
    return _divergence(shown, kind=found.kind, module=call.path, reference_module=ref.path,
                       op=found.op, reference_op=found.reference_op or None, source=found.source,
                       reference_source=found.reference_source,
                       inputs_differed=found.inputs_differed, detail=found.detail,
                       operands=found.operands)


def _divergence(diff: TensorDiff, **found: Any) -> Divergence:
    """A :class:`Divergence` at the tensor ``diff`` measured: its shapes, its largest
    differences and its worst element; what was found there (kind, module, op...) as keywords,
    no op or source line unless given."""
    where = dict(op=None, reference_op=None, source="", reference_source="",
                 inputs_differed=False)
    return Divergence(**(where | found | _measured(diff)))


def _measured(diff: TensorDiff) -> dict[str, Any]:
    """The fields of a :class:`Divergence` that describe the tensor ``diff`` measured."""
    return dict(shape=diff.shape, reference_shape=diff.reference_shape, max_abs=diff.max_abs,
                max_rel=diff.max_rel, worst_index=diff.worst_index)


def _no_grad(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return model(*private_inputs(inputs)[0])


def _compare_gradients(model: nn.Module, reference: nn.Module, inputs: tuple[Any, ...],
                       mine: _Recording, theirs: _Recording, alignment: Alignment,
                       tolerance: Tolerance) -> tuple[list[Drift], Divergence | None, str | None]:
    """Gradients of the loss (loss.py) with respect to every module output and parameter, by
    aligned name; the first differing in backward order, then the op whose backward made it
    (backward.py). Also says which loss it was."""
    loss = choose_loss(mine.output, theirs.output, inputs)
    if loss is None:
        return [], None, None
    named = dict(model.named_parameters())
    ref_named = dict(reference.named_parameters())
    names = _aligned_parameters(named, ref_named, mine.calls, theirs.calls, alignment)
    # module outputs with one tensor in the graph on both sides, latest first (backward order)
    outputs = sorted((p for p, r in alignment.pairs.items() if p not in alignment.parts
                      and len(mine.live[p]) == 1 and len(theirs.live[r]) == 1
                      and mine.live[p][0].shape == theirs.live[r][0].shape),
                     key=lambda p: -mine.calls[p].finished)
    grads = torch.autograd.grad(
        loss.of(mine.output), [*(named[n] for n, _ in names),
                               *(mine.live[p][0] for p in outputs)], allow_unused=True)
    ref_grads = torch.autograd.grad(
        loss.reference_of(theirs.output),
        [*(ref_named[r] for _, r in names),
         *(theirs.live[alignment.pairs[p]][0] for p in outputs)], allow_unused=True)
    output_first = _first_output_gradient(mine.calls, theirs.calls, alignment, outputs,
                                          grads[len(names):], ref_grads[len(names):], tolerance)
    grads, ref_grads = grads[:len(names)], ref_grads[:len(names)]
    ref_modules = dict(reference.named_modules())
    rows: list[Drift] = []
    first = output_first
    compared = list(zip(names, grads, ref_grads, strict=True))
    for (name, ref_name), grad, ref_grad in reversed(compared):
        if grad is None or ref_grad is None:
            continue
        owner = ref_name.rpartition(".")[0]
        if transposes(ref_name, ref_modules.get(owner), ref_grad, "auto"):
            ref_grad = ref_grad.T  # Hugging Face's Conv1D keeps its weight as (in, out)
        diff = measure(grad, ref_grad, tolerance)
        rows.append(Drift(module=name, reference_module=ref_name, max_abs=diff.max_abs,
                          max_rel=diff.max_rel, status=diff.status))
        if diff.differs and first is None:
            first = _divergence(diff, kind="gradient", module=name.rpartition(".")[0],
                                reference_module=ref_name.rpartition(".")[0],
                                detail=f"the gradient of `{name}` is the first (in backward "
                                       f"order) that differs from the reference's `{ref_name}`")
    if first is not None:  # the ops that consumed a module's output run in its parent
        first = _locate_backward(model, reference, inputs, mine.calls, theirs.calls, alignment,
                                 first, loss, tolerance, enclosing=first is output_first)
    return rows, first, loss.description


def _untied(model: nn.Module, reference: nn.Module) -> list[str]:
    """Notes on parameters the reference ties (one tensor under two names, GPT-2's ``wte`` and
    ``lm_head``) and the model keeps apart: their gradients differ by design."""
    tied: dict[int, list[str]] = {}
    for name, parameter in reference.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    mine = dict(model.named_parameters(remove_duplicate=False))
    notes = []
    for names in tied.values():
        if len(names) > 1 and all(n in mine for n in names) and \
                len({id(mine[n]) for n in names}) > 1:
            listed = " and ".join(f"`{n}`" for n in names)
            notes.append(f"the reference ties {listed} (one tensor, whose gradient sums every "
                         f"use); your model keeps them apart, so their gradients differ even "
                         f"where each use is right")
    return notes


def _locate_backward(model: nn.Module, reference: nn.Module, inputs: tuple[Any, ...],
                     calls: list[ModuleCall], references: list[ModuleCall],
                     alignment: Alignment, first: Divergence, loss: Loss,
                     tolerance: Tolerance, *, enclosing: bool) -> Divergence:
    """The op whose backward differs: inside the aligned call that encloses ``first.module``
    (``enclosing``: the ops that consumed its output run there), else inside its own call
    (a parameter's gradient: the ops that read it), else in the whole forward."""
    position = next((p for p in alignment.pairs if calls[p].path == first.module
                     and calls[p].index == 0), 0)
    if enclosing:
        position = calls[position].parent or 0
        while position not in alignment.pairs:
            position = calls[position].parent or 0
    call, ref = calls[position], references[alignment.pairs[position]]
    found = blame_backward(
        model, reference, lambda: _seeded(model, lambda: _with_grad(model, inputs)),
        lambda: _seeded(reference, lambda: _with_grad(reference, inputs)), call.key, ref.key,
        loss, tolerance)
    if found is None:
        return first
    located = dataclasses.replace(
        first, kind="gradient", module=found.module, reference_module=found.reference_module,
        op=found.op, reference_op=found.reference_op or None, source=found.source,
        reference_source=found.reference_source, detail=found.detail, operands=found.operands)
    shown = found.diff  # the gradient the op passes on, against the reference's
    if shown is None:
        return located
    return dataclasses.replace(located, **_measured(shown))


def _with_grad(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    with torch.enable_grad():
        return model(*private_inputs(inputs)[0])


def _first_output_gradient(calls: list[ModuleCall], references: list[ModuleCall],
                           alignment: Alignment, outputs: list[int],
                           grads: Sequence[torch.Tensor | None],
                           ref_grads: Sequence[torch.Tensor | None],
                           tolerance: Tolerance) -> Divergence | None:
    """The first module output (in backward order) whose incoming gradient differs: the
    backward of what ran after that module is where the gradients part."""
    for position, grad, ref_grad in zip(outputs, grads, ref_grads, strict=True):
        if grad is None or ref_grad is None:
            continue
        diff = measure(grad, ref_grad, tolerance)
        if diff.differs:
            call, ref = calls[position], references[alignment.pairs[position]]
            return _divergence(diff, kind="gradient", module=call.path, reference_module=ref.path,
                               detail=f"the gradient reaching the output of "
                                     f"`{call.path or 'the model'}` is the first (in backward "
                                     f"order) that differs: the backward of what runs after "
                                     f"it is where the gradients part")
    return None


def _aligned_parameters(named: dict[str, nn.Parameter], ref_named: dict[str, nn.Parameter],
                        calls: list[ModuleCall], references: list[ModuleCall],
                        alignment: Alignment) -> list[tuple[str, str]]:
    """``(model name, reference name)`` of parameters, in model order: same names, else the
    direct parameters of aligned modules in order."""
    if all(name in ref_named for name in named):
        return [(name, name) for name in named]
    modules = {calls[p].path: references[r].path for p, r in alignment.pairs.items()}
    found = []
    for name in named:
        owner, _, leaf = name.rpartition(".")
        ref_owner = modules.get(owner)
        if ref_owner is not None:
            ref_name = f"{ref_owner}.{leaf}" if ref_owner else leaf
            if ref_name in ref_named:
                found.append((name, ref_name))
    return found

"""The op-level pass for gradients: which op's *backward* made the gradients part.

The module-level pass found the first module output (or parameter) whose gradient differs, in
backward order. Here both sides run again with the graph kept, recording every op inside the
enclosing module call; the model's ops are paired with the reference's by their forward values
(which agree: a forward difference is reported first). Walking the ops from the output side,
the first op whose incoming gradient (of its output) agrees with the reference's while the
gradient it passes to one of its operands does not is the op whose backward differs: a custom
``autograd.Function`` with a wrong ``backward``, or a ``detach()`` / ``torch.no_grad()`` that
cuts a path the reference's gradient takes (then the op that cut it is named).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from torchlens_edu._core.formatting import dtype_name
from torchlens_edu.divergence.blame import OpBlame, ReferenceValues, operand_name
from torchlens_edu.divergence.loss import Loss
from torchlens_edu.divergence.ops import OpCall, record_ops
from torchlens_edu.divergence.result import Operand
from torchlens_edu.divergence.tolerance import Tolerance, measure

Grads = dict[tuple[int, int], torch.Tensor]


def _output_grads(ops: Sequence[OpCall], scalar: torch.Tensor) -> Grads:
    """The gradient of ``scalar`` with respect to every recorded op output in the graph."""
    keys = [(i, k) for i, op in enumerate(ops) for k, t in enumerate(op.live_outputs)
            if t.requires_grad]
    grads = torch.autograd.grad(scalar, [ops[i].live_outputs[k] for i, k in keys],
                                retain_graph=True, allow_unused=True)
    return {key: grad for key, grad in zip(keys, grads, strict=True) if grad is not None}


def _passed_on(op: OpCall, position: int, grads: Grads) -> list[torch.Tensor | None]:
    """What the op's own backward passes to each operand (None: no gradient reaches it)."""
    outs = [(k, t) for k, t in enumerate(op.live_outputs) if t.requires_grad]
    wanted = [j for j, t in enumerate(op.live_inputs) if t.requires_grad]
    passed: list[torch.Tensor | None] = [None] * len(op.live_inputs)
    if not outs or not wanted:
        return passed
    incoming = [grads.get((position, k), torch.zeros_like(t)) for k, t in outs]
    found = torch.autograd.grad([t for _, t in outs], [op.live_inputs[j] for j in wanted],
                                incoming, retain_graph=True, allow_unused=True)
    for j, grad in zip(wanted, found, strict=True):
        passed[j] = grad
    return passed


def _custom_backward(op: OpCall) -> str:
    """``HalfGradient.backward at file.py:LINE`` when the op's output comes out of a custom
    ``autograd.Function``, else ``""``."""
    grad_fn = next((t.grad_fn for t in op.live_outputs if t.grad_fn is not None), None)
    function = getattr(grad_fn, "_forward_cls", None)
    if function is None:
        return ""
    try:
        lines, line = inspect.getsourcelines(function.backward)
        line += next((i for i, text in enumerate(lines) if text.lstrip().startswith("def ")), 0)
        where = f" at {os.path.basename(inspect.getsourcefile(function.backward) or '')}:{line}"
    except (OSError, TypeError):
        where = ""
    return f"{function.__name__}.backward{where}"


def _counterpart(values: ReferenceValues, op: OpCall, reference: Sequence[OpCall]) -> int | None:
    """The reference op that returns what ``op`` returns (the same name first)."""
    if not op.outputs:
        return None
    made = [r for r in values.made(op.outputs[0]) if r >= 0]
    same = [r for r in made if reference[r].name == op.name]
    candidates = same or made
    return candidates[-1] if candidates else None


def blame_backward(model: nn.Module, reference: nn.Module, forward: Callable[[], Any],
                   reference_forward: Callable[[], Any], target: tuple[str, int],
                   reference_target: tuple[str, int], loss: Loss,
                   tolerance: Tolerance) -> OpBlame | None:
    """The op whose backward makes the gradients part (see the module docstring), or None."""
    ops, _, output = record_ops(model, forward, target, keep_graph=True)
    ref_ops, _, ref_output = record_ops(reference, reference_forward, reference_target,
                                        keep_graph=True)
    grads = _output_grads(ops, loss.of(output))
    ref_grads = _output_grads(ref_ops, loss.reference_of(ref_output))
    values = ReferenceValues(ref_ops, tolerance)
    for position in range(len(ops) - 1, -1, -1):
        op = ops[position]
        r = _counterpart(values, op, ref_ops)
        if r is None or not any(t.requires_grad for t in op.live_inputs):
            continue
        ref = ref_ops[r]
        incoming = [(grads.get((position, k)), ref_grads.get((r, k)))
                    for k in range(min(len(op.outputs), len(ref.outputs)))]
        if any(a is not None and b is not None and measure(a, b, tolerance).differs
               for a, b in incoming):
            continue  # its incoming gradient already differs: the cause is later in the forward
        passed, ref_passed = _passed_on(op, position, grads), _passed_on(ref, r, ref_grads)
        for j in range(min(len(op.inputs), len(ref.inputs))):
            if op.inputs[j].shape != ref.inputs[j].shape:
                continue
            found = _compare_passed(ops, position, r, ref_ops, j, passed[j], ref_passed[j],
                                    incoming, tolerance)
            if found is not None:
                return found
    return None


def _compare_passed(ops: Sequence[OpCall], position: int, r: int, ref_ops: Sequence[OpCall],
                    j: int, grad: torch.Tensor | None, ref_grad: torch.Tensor | None,
                    incoming: list[tuple[torch.Tensor | None, torch.Tensor | None]],
                    tolerance: Tolerance) -> OpBlame | None:
    op, ref = ops[position], ref_ops[r]
    name = operand_name(ops, op, j)
    if grad is None and ref_grad is not None:
        made = op.producers[j]
        cut = ops[made[0]] if made is not None else op
        if made is not None and not any(t.requires_grad for t in cut.live_inputs):
            cut = op
        return OpBlame(
            kind="gradient", module=cut.module, reference_module=ref.module, op=cut.shown,
            reference_op=ref.shown, source=cut.source,
            reference_source=ref.source, diff=measure(torch.zeros_like(ref_grad), ref_grad,
                                                      tolerance),
            inputs_differed=False, operands=_grad_operands(ops, ref_ops, position, r, incoming, j,
                                                           None, ref_grad, tolerance),
            detail=f"`{cut.shown}` at {cut.source} cuts the gradient (its result does not "
                   f"require grad: a detach(), .data or torch.no_grad()); the reference's "
                   f"gradient flows on to `{name}` of `{op.shown}` at {op.source}")
    if grad is None or ref_grad is None:
        return None
    diff = measure(grad, ref_grad, tolerance)
    if not diff.differs:
        return None
    custom = _custom_backward(op)
    whose = f" (its backward is {custom})" if custom else ""
    return OpBlame(
        kind="gradient", module=op.module, reference_module=ref.module, op=op.shown,
        reference_op=ref.shown, source=op.source,
        reference_source=ref.source, diff=diff, inputs_differed=False,
        operands=_grad_operands(ops, ref_ops, position, r, incoming, j, grad, ref_grad,
                                tolerance),
        detail=f"the backward of `{op.shown}` at {op.source}{whose}: the gradient reaching its "
               f"output agrees with the reference's, the gradient it passes to `{name}` does "
               f"not")


def _grad_operands(ops: Sequence[OpCall], ref_ops: Sequence[OpCall], position: int, r: int,
                   incoming: list[tuple[torch.Tensor | None, torch.Tensor | None]], j: int,
                   grad: torch.Tensor | None, ref_grad: torch.Tensor | None,
                   tolerance: Tolerance) -> list[Operand]:
    """The gradient reaching the op's output and the one it passes to operand ``j``."""
    op, ref = ops[position], ref_ops[r]
    rows = []
    out_name = op.output_names[0] if op.output_names and op.output_names[0] else "output"
    ref_out = ref.output_names[0] if ref.output_names and ref.output_names[0] else "output"
    in_name, ref_in = operand_name(ops, op, j), operand_name(ref_ops, ref, j)
    pairs = [*((f"grad of out {k}" if len(incoming) > 1 else "grad of out",
                f"d loss / d {out_name}", f"d loss / d {ref_out}", a, b)
               for k, (a, b) in enumerate(incoming)),
             (f"grad to in {j}", f"d loss / d {in_name}", f"d loss / d {ref_in}", grad,
              ref_grad)]
    for role, name, ref_name, a, b in pairs:
        shown = a if a is not None else b
        if shown is None:
            continue
        diff = measure(a, b, tolerance) if a is not None and b is not None else None
        rows.append(Operand(role=role, name=name if a is not None else f"{name}: no gradient",
                            shape=tuple(shown.shape),
                            dtype=dtype_name(shown.dtype),
                            reference_name=ref_name if b is not None else "",
                            reference_shape=tuple(b.shape) if b is not None else None,
                            max_abs=None if diff is None else diff.max_abs,
                            status="" if diff is None else diff.status))
    return rows

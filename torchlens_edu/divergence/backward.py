"""The op-level pass for gradients: which op's *backward* made the gradients part.

The module-level pass found the first module output (or parameter) whose gradient differs, in
backward order. Here both sides run again with the graph kept, recording every op inside the
enclosing module call; the model's ops are paired with the reference's by their forward values
(which agree: a forward difference is reported first). Walking the values from the output
side, the first one whose gradient (the sum over every op that reads it) differs from the
reference's, while the gradients of what those readers return agree, was made to differ by a
reader's backward: a custom ``autograd.Function`` with a wrong ``backward``, or a ``detach()``
/ ``torch.no_grad()`` that cuts a path the reference's gradient takes. Only gradients of whole
values are compared, never "what one op passes back" (``autograd.grad`` of an op's output
with respect to its operand would also follow any other path between them, through tied
weights for one).
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
    readers: dict[tuple[int, int], list[int]] = {}  # an op's output -> the ops that read it
    for position, op in enumerate(ops):
        for made in op.producers:
            if made is not None and position not in readers.setdefault(made, []):
                readers[made].append(position)
    # from the output side: the latest value whose gradient differs from the reference's
    for position in range(len(ops) - 1, -1, -1):
        r = _counterpart(values, ops[position], ref_ops)
        if r is None:
            continue
        for k in range(min(len(ops[position].outputs), len(ref_ops[r].outputs))):
            grad, ref_grad = grads.get((position, k)), ref_grads.get((r, k))
            if (grad is None and ref_grad is None) or not readers.get((position, k)):
                continue
            if grad is not None and ref_grad is not None and \
                    not measure(grad, ref_grad, tolerance).differs:
                continue
            op = ops[position]
            if grad is None and not any(t.requires_grad for t in op.live_outputs) and \
                    any(t.requires_grad for t in op.live_inputs):  # this op cut the graph
                return _cut(ops, ref_ops, position, r, grads, ref_grads, tolerance)
            return _blame_readers(ops, ref_ops, values, grads, ref_grads, (position, k), r,
                                  readers[position, k], tolerance)
    return None


def _cut(ops: Sequence[OpCall], ref_ops: Sequence[OpCall], position: int, r: int,
         grads: Grads, ref_grads: Grads, tolerance: Tolerance) -> OpBlame:
    """The op at ``position`` returns a value without a gradient where the reference's value
    has one: it cut the graph."""
    op, ref = ops[position], ref_ops[r]
    j = next(j for j, t in enumerate(op.live_inputs) if t.requires_grad)
    ref_grad = ref_grads[r, 0]
    return OpBlame(kind="gradient", module=op.module, reference_module=ref.module, op=op.shown,
                   reference_op=ref.shown, source=op.source, reference_source=ref.source,
                   diff=measure(torch.zeros_like(ref_grad), ref_grad, tolerance),
                   inputs_differed=False,
                   operands=_grad_operands(ops, ref_ops, position, r, grads, ref_grads, j,
                                           None, None, tolerance)[:1],
                   detail=f"`{op.shown}` at {op.source} cuts the gradient (its result does not "
                          f"require grad: a detach(), .data or torch.no_grad()); the "
                          f"reference's gradient flows back to `{operand_name(ops, op, j)}` "
                          f"there")


def _blame_readers(ops: Sequence[OpCall], ref_ops: Sequence[OpCall], values: ReferenceValues,
                   grads: Grads, ref_grads: Grads, value: tuple[int, int], r: int,
                   readers: list[int], tolerance: Tolerance) -> OpBlame:
    """The gradient of ``value`` differs while the gradients of what its readers return agree
    (they come later in the forward): one reader's backward passes on another gradient, or
    cuts it (its result does not require grad where the reference's gradient flows)."""
    grad, ref_grad = grads.get(value), ref_grads.get((r, value[1]))
    cut = [p for p in readers if not any(t.requires_grad for t in ops[p].live_outputs)
           and any(t.requires_grad for t in ops[p].live_inputs)]
    custom = [p for p in readers if _custom_backward(ops[p])]
    at = (cut or custom or readers)[0]
    reader = ops[at]
    j = next(j for j, made in enumerate(reader.producers) if made == value)
    name = operand_name(ops, reader, j)
    theirs = _counterpart(values, reader, ref_ops)
    ref = ref_ops[theirs] if theirs is not None else None
    reference_grad = ref_grad if ref_grad is not None else (
        torch.zeros_like(grad) if grad is not None else None)
    shown_grad = grad if grad is not None else torch.zeros_like(ref_grad)  # type: ignore[arg-type]
    diff = measure(shown_grad, reference_grad, tolerance) if reference_grad is not None else None
    rows = _grad_operands(ops, ref_ops, at, theirs, grads, ref_grads, j, grad, ref_grad,
                          tolerance)
    common = dict(kind="gradient", module=reader.module,
                  reference_module=ref.module if ref is not None else "", op=reader.shown,
                  reference_op=ref.shown if ref is not None else "", source=reader.source,
                  reference_source=ref.source if ref is not None else "", diff=diff,
                  inputs_differed=False, operands=rows)
    if cut:
        return OpBlame(**common,  # type: ignore[arg-type]
                       detail=f"`{reader.shown}` at {reader.source} cuts the gradient (its "
                              f"result does not require grad: a detach(), .data or "
                              f"torch.no_grad()); the reference's gradient flows back to "
                              f"`{name}` there")
    others = [ops[p] for p in readers if ops[p] is not reader]
    also = "".join(f"; `{o.shown}` at {o.source} reads it too" for o in others[:2])
    whose = f" (its backward is {_custom_backward(reader)})" if custom else ""
    return OpBlame(**common,  # type: ignore[arg-type]
                   detail=f"the backward of `{reader.shown}` at {reader.source}{whose}: the "
                          f"gradient reaching its output agrees with the reference's, the "
                          f"gradient of `{name}` does not{also}")


def _grad_operands(ops: Sequence[OpCall], ref_ops: Sequence[OpCall], position: int,
                   r: int | None, grads: Grads, ref_grads: Grads, j: int,
                   grad: torch.Tensor | None, ref_grad: torch.Tensor | None,
                   tolerance: Tolerance) -> list[Operand]:
    """The gradient reaching the reader's output, and the gradient of its operand ``j``."""
    op, ref = ops[position], ref_ops[r] if r is not None else None
    rows = []
    out_name = op.output_names[0] if op.output_names and op.output_names[0] else "output"
    ref_out = (ref.output_names[0] if ref is not None and ref.output_names
               and ref.output_names[0] else "output")
    in_name = operand_name(ops, op, j)
    ref_in = operand_name(ref_ops, ref, j) if ref is not None and j < len(ref.inputs) else ""
    pairs = [("grad of out", f"d loss / d {out_name}", f"d loss / d {ref_out}",
              grads.get((position, 0)), ref_grads.get((r, 0)) if r is not None else None),
             (f"grad of in {j}", f"d loss / d {in_name}", f"d loss / d {ref_in}", grad,
              ref_grad)]
    for role, name, ref_name, a, b in pairs:
        shown = a if a is not None else b
        if shown is None:
            continue
        diff = measure(a, b, tolerance) if a is not None and b is not None else None
        rows.append(Operand(role=role, name=name if a is not None else f"{name}: no gradient",
                            shape=tuple(shown.shape), dtype=dtype_name(shown.dtype),
                            reference_name=ref_name if b is not None else "",
                            reference_shape=tuple(b.shape) if b is not None else None,
                            max_abs=None if diff is None else diff.max_abs,
                            status="" if diff is None else diff.status))
    return rows

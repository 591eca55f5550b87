"""The op-level pass: every torch call inside one module call, on both sides, and the first op
that made the difference.

Runs only inside the first diverging module (the module-level pass found it), with the op
recorder of the shape tracer (:class:`~torchlens_edu.shapes.ops.OpRecorder`). Ops are aligned
by name in order (a learner's extra ``.contiguous()`` is no difference); the blame lands on the
first op whose *inputs agreed* and whose output does not, or on the op the model skipped or
added just before the first difference, or on a weight that already differed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torchlens_edu._core.frames import source_location
from torchlens_edu.divergence.align import matching_pairs, pair_tensors
from torchlens_edu.divergence.tolerance import TensorDiff, Tolerance, measure
from torchlens_edu.shapes.ops import OpRecorder, tensors_in, tensors_out, user_site


@dataclass(kw_only=True)
class OpCall:
    """One recorded torch call: its name, the user's line, its operands and results (copies)."""

    name: str
    source: str  # "file.py:LINE" of the user's line ("" when unknown)
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    parameters: list[str | None]  # for each input: the parameter it is, if it is one


class _OpLog:
    """An :class:`~torchlens_edu.shapes.ops.OpListener` that keeps the ops of one module call."""

    ops = True  # record op events (not only count them)
    meta = False
    home = torch.device("cpu")

    def __init__(self, parameter_names: dict[int, str]) -> None:
        self.calls: list[OpCall] = []
        self.active = False
        self._parameter_names = parameter_names

    def op_done(self, name: str, args: Any, kwargs: dict[str, Any], result: Any,
                frame: Any) -> None:
        if not self.active:
            return
        site = user_site(frame)
        inputs = tensors_in(args, kwargs)
        self.calls.append(OpCall(
            name=name, source=source_location(*site) if site else "",
            inputs=[t.detach().clone() for t in inputs],
            outputs=[t.detach().clone() for t in tensors_out(result)],
            parameters=[self._parameter_names.get(id(t)) for t in inputs]))

    def op_failed(self, name: str, args: Any, kwargs: dict[str, Any], exc: Exception,
                  site: tuple[str, int] | None) -> None:
        """A failing op fails the run itself; there is nothing to keep."""


def record_ops(model: nn.Module, run: Callable[[], Any], target: tuple[str, int]) -> list[OpCall]:
    """The ops of call ``target = (path, index)`` of a module of ``model`` while ``run()`` runs."""
    path, index = target
    module = model.get_submodule(path)
    log = _OpLog({id(p): name for name, p in model.named_parameters(remove_duplicate=False)})
    calls = 0

    def enter(*_: Any) -> None:
        nonlocal calls
        log.active = calls == index
        calls += 1

    def leave(*_: Any) -> None:
        log.active = False

    handles = [module.register_forward_pre_hook(enter),
               module.register_forward_hook(leave, always_call=True)]
    try:
        with OpRecorder(log):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return log.calls


@dataclass(kw_only=True)
class OpBlame:
    """Where, inside the module, the difference starts."""

    kind: str  # "op", "weights", "missing-op", "extra-op" or "shape"
    op: str
    reference_op: str
    source: str
    reference_source: str
    diff: TensorDiff | None  # the op's output against the reference's
    inputs_differed: bool
    detail: str  # one sentence: what differs


def _outputs_diff(a: OpCall, b: OpCall, tolerance: Tolerance) -> TensorDiff | None:
    worst = None
    for i, j in pair_tensors(a.outputs, b.outputs):
        diff = measure(a.outputs[i], b.outputs[j], tolerance)
        if worst is None or (diff.differs, diff.max_abs) > (worst.differs, worst.max_abs):
            worst = diff
    return worst


def _differing_input(a: OpCall, b: OpCall, tolerance: Tolerance) -> int | None:
    if len(a.inputs) != len(b.inputs):
        return 0
    for i, (x, y) in enumerate(zip(a.inputs, b.inputs, strict=True)):
        if measure(x, y, tolerance).differs:
            return i
    return None


def blame(ops: list[OpCall], reference: list[OpCall], tolerance: Tolerance) -> OpBlame | None:
    """The first op that made the difference (see the module docstring), or None."""
    # model op -> reference op of the same name, in order
    matched = matching_pairs([op.name for op in ops], [op.name for op in reference])
    for i, j in matched.items():
        diff = _outputs_diff(ops[i], reference[j], tolerance)
        if diff is not None and diff.differs:
            return _blame_at(ops, reference, matched, i, j, diff, tolerance)
    return None


def _producer(ops: list[OpCall], before: int, value: torch.Tensor) -> int | None:
    """The last op before ``before`` that returned exactly ``value`` (where an operand came
    from: the ops keep copies, so the values tell, not the tensor objects)."""
    for position in range(before - 1, -1, -1):
        for output in ops[position].outputs:
            if output.shape == value.shape and output.dtype == value.dtype and \
                    torch.equal(output, value):
                return position
    return None


def _blame_at(ops: list[OpCall], reference: list[OpCall], matched: dict[int, int], i: int,
              j: int, diff: TensorDiff, tolerance: Tolerance) -> OpBlame:
    a, b = ops[i], reference[j]
    differing = _differing_input(a, b, tolerance)
    if differing is None:
        kind = "shape" if diff.status == "shape" else "op"
        what = ("its output has another shape" if kind == "shape"
                else "its inputs agree and its output does not")
        return OpBlame(kind=kind, op=a.name, reference_op=b.name, source=a.source,
                       reference_source=b.source, diff=diff, inputs_differed=False,
                       detail=f"`{a.name}` at {a.source}: {what}")
    weight = a.parameters[differing] if differing < len(a.parameters) else None
    if weight is not None:
        return OpBlame(kind="weights", op=a.name, reference_op=b.name, source=a.source,
                       reference_source=b.source, diff=diff, inputs_differed=True,
                       detail=f"`{a.name}` at {a.source} reads the parameter `{weight}`, "
                              f"which already differs from the reference's (a weight loaded "
                              f"without its transpose?)")
    mine = _producer(ops, i, a.inputs[differing])
    theirs = (_producer(reference, j, b.inputs[differing])
              if differing < len(b.inputs) else None)
    extra = mine is not None and mine not in matched
    skipped = theirs is not None and theirs not in matched.values()
    if extra and mine is not None:  # the model did something the reference does not
        op = ops[mine]
        shapes = ", ".join(str(tuple(t.shape)) for t in op.outputs)
        instead = (f"; the reference does `{reference[theirs].name}` there"
                   if skipped and theirs is not None else "")
        return OpBlame(kind="extra-op", op=op.name, reference_op="", source=op.source,
                       reference_source=b.source, diff=diff, inputs_differed=False,
                       detail=f"`{op.name}` at {op.source} (output {shapes}) has no "
                              f"counterpart in the reference{instead}")
    if skipped and theirs is not None:  # the model left out something the reference does
        op = reference[theirs]
        # dropped from a line that otherwise ran (a missing `/ sqrt(hs)`): that line is the bug
        source = a.source
        if mine is not None and reference[matched[mine]].source == op.source:
            source = ops[mine].source
        return OpBlame(kind="missing-op", op=a.name, reference_op=op.name, source=source,
                       reference_source=op.source, diff=diff, inputs_differed=False,
                       detail=f"your model skips `{op.name}`, which the reference does at "
                              f"{op.source}")
    return OpBlame(kind="op", op=a.name, reference_op=b.name, source=a.source,
                   reference_source=b.source, diff=diff, inputs_differed=True,
                   detail=f"`{a.name}` at {a.source}: its input {differing} already differed "
                          f"and no recorded op made the difference")

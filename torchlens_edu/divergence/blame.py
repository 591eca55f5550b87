"""Which op made the difference: ops are paired by what they compute, not by their names.

The model's ops inside the diverging module call are followed back from what the call
returned, through every value the reference computes nowhere (no reference op returns numbers
within the tolerance of it, in the same shape), to the first op whose *operands* the
reference does compute but whose *result* it does not: that op made the difference. So a
``softmax`` over the wrong axis is found whatever the reference called its ops, and ``F.linear``
against Hugging Face's ``addmm`` + ``view``, or a hand-written GELU against ``F.gelu``, pair by
their values (a fused op on one side only is first written out in steps, ``steps.py``).

The blamed op is then set against the reference op that does the same thing (same name, after
the reference's copies of its operands): when that op reads something else, the reference
did something the model skipped (a missing ``/ sqrt(hs)``); when there is none, the model did
something the reference does not (``x[:, [-1], :]``); when an operand is a parameter the
reference holds nowhere, the weight already differed.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from torchlens_edu._core.formatting import dtype_name
from torchlens_edu.divergence.align import matching_pairs, pair_tensors
from torchlens_edu.divergence.ops import OpCall
from torchlens_edu.divergence.result import Operand
from torchlens_edu.divergence.tolerance import TensorDiff, Tolerance, core_shape, measure

_CHAIN = 16  # how many reference ops a skipped stretch may have
_OPERANDS = 4  # operands shown per op
# ops a learner writes as methods, shown on their tensor: k.transpose(...)
_METHODS = frozenset({"transpose", "view", "reshape", "permute", "contiguous", "split",
                      "chunk", "float", "to", "masked_fill", "unsqueeze", "squeeze", "expand",
                      "repeat", "flatten", "detach", "clone", "tril", "triu"})


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
    operands: list[Operand]
    module: str = ""  # the module whose code ran the op
    reference_module: str = ""


class ReferenceValues:
    """Every value one side's ops read or returned (the reference's, mostly), by shape: does
    it compute this?"""

    def __init__(self, ops: Sequence[OpCall], tolerance: Tolerance) -> None:
        self._tolerance = tolerance
        # (shape without leading 1s, floating?) -> [(op position, tensor, sum, sum of |x|)]
        self._by_shape: dict[tuple[object, bool], list[tuple[int, torch.Tensor, float, float]]]
        self._by_shape = defaultdict(list)
        self._cache: dict[int, list[int]] = {}
        self._masks: dict[tuple[int, ...], list[torch.Tensor]] = {}  # what additive masks hide
        for position, op in enumerate(ops):
            for tensor in op.outputs:
                self._add(position, tensor)
            for tensor, made in zip(op.inputs, op.producers, strict=True):
                if made is None:  # read from outside the recorded ops: an input, a parameter
                    self._add(-1, tensor)

    def _add(self, position: int, tensor: torch.Tensor) -> None:
        total, size = _sums(tensor)
        self._by_shape[_key(tensor)].append((position, tensor, total, size))
        hidden = _hidden(tensor)
        if hidden is not None:
            self._masks.setdefault(tuple(hidden.shape), []).append(hidden)

    def _is_mask(self, value: torch.Tensor) -> bool:
        """A boolean mask that hides what the reference's additive mask hides (``-inf`` or
        the dtype's lowest number where a query may not look), either way round."""
        if value.dtype != torch.bool:
            return False
        core = value.reshape(core_shape(tuple(value.shape)))
        return any(torch.equal(core, mask) or torch.equal(~core, mask)
                   for mask in self._masks.get(tuple(core.shape), []))

    def made(self, value: torch.Tensor) -> list[int]:
        """The positions of the reference ops that return ``value`` within the tolerance
        (-1: a value read from outside its ops), in order; empty: it computes it nowhere."""
        found = self._cache.get(id(value))
        if found is None:
            found = self._cache[id(value)] = [
                position for position, tensor in self._candidates(value)
                if not measure(value, tensor, self._tolerance).differs]
        return found

    def _candidates(self, value: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Same shape, and sums close enough that every element may be (a cheap first cut:
        |a - b| <= atol + rtol |b| elementwise bounds the difference of the sums)."""
        total, _ = _sums(value)
        rtol, atol = self._tolerance.limits(value.dtype)
        kept = []
        for position, tensor, ref_total, ref_size in self._by_shape.get(_key(value), []):
            bound = atol * tensor.numel() + rtol * ref_size
            if not math.isfinite(total - ref_total) or abs(total - ref_total) <= bound * (
                    1 + 1e-6) + 1e-9 * (abs(total) + ref_size):
                kept.append((position, tensor))
        return kept

    def holds(self, value: torch.Tensor, *, leaf: bool = False) -> bool:
        """The reference computes ``value`` somewhere; a leaf (a parameter) also counts when
        the reference keeps it transposed and it is not square (Hugging Face's ``Conv1D``)."""
        if self.made(value) or self._is_mask(value):
            return True
        return leaf and value.dim() == 2 and value.shape[0] != value.shape[1] and \
            bool(self.made(value.T))


def _hidden(tensor: torch.Tensor) -> torch.Tensor | None:
    """Where a float tensor holds ``-inf`` (or the dtype's lowest numbers), as one boolean
    mask without the axes it is the same along ((B, 1, T, T) -> (T, T)); None: no such
    entry."""
    lowest = torch.finfo(tensor.dtype).min / 2 if tensor.is_floating_point() else 0.0
    if not tensor.is_floating_point() or tensor.dim() < 2 or float(tensor.amin()) > lowest:
        return None
    hidden = tensor <= lowest
    while hidden.dim() > 2 and bool((hidden == hidden[:1]).all()):
        hidden = hidden[0]
    return hidden.reshape(core_shape(tuple(hidden.shape)))


def _key(tensor: torch.Tensor) -> tuple[object, bool]:
    return core_shape(tuple(tensor.shape)), tensor.is_floating_point()


def _sums(tensor: torch.Tensor) -> tuple[float, float]:
    if tensor.numel() == 0 or tensor.dtype == torch.bool or tensor.is_complex():
        return 0.0, 0.0
    value = tensor.detach()
    return (float(value.sum(dtype=torch.float64)),
            float(value.abs().sum(dtype=torch.float64)))


def operand_name(ops: Sequence[OpCall], op: OpCall, j: int, *, depth: int = 1) -> str:
    """How the user knows operand ``j`` of ``op``: their variable (``q``), the parameter's
    name, the name a line gave the op that made it, or that op on its own first operand
    (``~mask``, ``k.transpose(...)``, ``softmax(...)``)."""
    made = op.producers[j]
    if j < len(op.names) and op.names[j]:
        return op.names[j]
    parameter = op.parameters[j]
    if parameter:
        return parameter
    if made is None:
        return "input"
    producer = ops[made[0]]
    if made[1] < len(producer.output_names) and producer.output_names[made[1]]:
        return producer.output_names[made[1]]
    if producer.step:
        return producer.step
    inner = operand_name(ops, producer, 0, depth=depth - 1) if producer.inputs and depth \
        else "..."
    if producer.name in ("~", "-x"):
        return f"{producer.name[0]}{inner}"
    if producer.name.startswith("."):  # an attribute: x.T
        return f"{inner}{producer.name}"
    return f"{inner}.{producer.name}(...)" if producer.name in _METHODS else \
        f"{producer.name}(...)"


def _called(op: OpCall) -> str:
    return f"`{op.fused}` (its step `{op.step}`)" if op.step else f"`{op.name}`"


def worst_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                     tolerance: Tolerance) -> TensorDiff | None:
    """The largest difference between the paired tensors of two outputs (one that exceeds the
    tolerance first), or None when no tensor pairs."""
    worst = None
    for i, j in pair_tensors(a, b):
        diff = measure(a[i], b[j], tolerance)
        if worst is None or (diff.differs, diff.max_abs) > (worst.differs, worst.max_abs):
            worst = diff
    return worst


class _Blame:
    """One search: the model's ops, the reference's, and what the reference computes."""

    def __init__(self, ops: list[OpCall], reference: list[OpCall], tolerance: Tolerance) -> None:
        self.ops, self.reference, self.tolerance = ops, reference, tolerance
        self.values = ReferenceValues(reference, tolerance)
        self.structural = matching_pairs([op.name for op in ops], [op.name for op in reference])
        self._mine: ReferenceValues | None = None

    @property
    def mine(self) -> ReferenceValues:
        """What the model computes, indexed the same way (built when first asked)."""
        if self._mine is None:
            self._mine = ReferenceValues(self.ops, self.tolerance)
        return self._mine

    def input_held(self, op: OpCall, j: int) -> bool:
        """The reference computes operand ``j`` of ``op`` too; a constant made from no tensor
        (``torch.ones(T, T)``) counts as held: the reference may build its own elsewhere
        (Hugging Face makes the causal mask outside the attention), and what is made from it
        tells (a mask against the reference's, see :meth:`ReferenceValues.holds`)."""
        made = op.producers[j]
        if made is None:
            return self.values.holds(op.inputs[j], leaf=True)
        if not self.ops[made[0]].inputs:
            return True
        return self.values.holds(self.ops[made[0]].outputs[made[1]])

    def frontier(self, returned: Sequence[tuple[int, int] | None]) -> int | None:
        """The first op (in the order they ran) whose result the reference computes nowhere
        while it computes every operand, on the way back from what the call returned."""
        stack = [made for made in returned
                 if made is not None and not self.values.holds(self.ops[made[0]].outputs[made[1]])]
        seen: set[int] = set()
        found: list[int] = []
        while stack:
            position, _ = stack.pop()
            if position in seen:
                continue
            seen.add(position)
            op = self.ops[position]
            missing = [j for j in range(len(op.inputs)) if not self.input_held(op, j)]
            made = [op.producers[j] for j in missing]
            if any(m is None for m in made) or not made:
                found.append(position)
            stack.extend(m for m in made if m is not None)
        return min(found) if found else None

    def counterpart(self, position: int) -> int | None:
        """The reference op that does what the model's op at ``position`` does: the same name,
        after the reference ops that return its operands (the one in the same place in the
        sequence of op names first, then one of the same output shape)."""
        op = self.ops[position]
        after = -1
        for j, tensor in enumerate(op.inputs):
            if op.producers[j] is not None:
                made = [p for p in self.values.made(tensor) if p >= 0]
                if made:
                    after = max(after, made[0])
        same = [r for r, ref in enumerate(self.reference) if r > after and ref.name == op.name]
        if self.structural.get(position) in same:
            return self.structural[position]
        shape = core_shape(tuple(op.outputs[0].shape)) if op.outputs else None
        shaped = [r for r in same if self.reference[r].outputs and
                  core_shape(tuple(self.reference[r].outputs[0].shape)) == shape]
        candidates = shaped or same
        return candidates[0] if candidates else None

    def skipped(self, r: int, j: int, value: torch.Tensor) -> list[int]:
        """Reference ops between ``value`` (what the model's op reads) and operand ``j`` of
        reference op ``r``, nearest to ``r`` first; empty when ``value`` is not upstream."""
        chain: list[int] = []
        made = self.reference[r].producers[j] if j < len(self.reference[r].producers) else None
        while made is not None and len(chain) < _CHAIN:
            op = self.reference[made[0]]
            if not measure(value, op.outputs[made[1]], self.tolerance).differs:
                return chain
            chain.append(made[0])
            shaped = [p for t, p in zip(op.inputs, op.producers, strict=True)
                      if p is not None and core_shape(tuple(t.shape)) ==
                      core_shape(tuple(value.shape))]
            upstream = shaped or [p for p in op.producers if p is not None]
            made = upstream[0] if upstream else None
        return []

    def skipped_before(self, position: int) -> tuple[int, int] | None:
        """``(reference op, operand)``: a reference op that reads what the model's op at
        ``position`` reads as that operand, returns a result of the same shape as the model's
        op, and one the model computes nowhere: the model left it out before its op."""
        op = self.ops[position]
        shape = core_shape(tuple(op.outputs[0].shape)) if op.outputs else None
        for j, tensor in enumerate(op.inputs):
            if op.producers[j] is None:
                continue
            sources = {p for p in self.values.made(tensor) if p >= 0}
            for r, ref in enumerate(self.reference):
                if ref.outputs and core_shape(tuple(ref.outputs[0].shape)) == shape and any(
                        p is not None and p[0] in sources for p in ref.producers) and \
                        not self.mine.made(ref.outputs[0]):
                    return r, j
        return None

    def blamed_line(self, position: int, j: int, missing: OpCall) -> str:
        """The model's line to blame for a skipped reference op: the line of the model op
        that made operand ``j`` when its counterpart shares the skipped op's line (a
        ``/ sqrt(hs)`` dropped from ``q @ k.transpose(-2, -1)``), else the op's own."""
        op, mine = self.ops[position], self.ops[position].producers[j]
        partner = self.structural.get(mine[0]) if mine is not None else None
        if mine is not None and partner is not None and \
                self.reference[partner].source == missing.source:
            return self.ops[mine[0]].source
        return op.source

    def fused(self, position: int) -> tuple[int, int] | None:
        """``(reference op, model op)``: a reference op that reads what the model's op at
        ``position`` reads and returns in one call what a later model op, fed by it, returns
        (a fused op against a run of ops, with no steps to compare them with)."""
        op = self.ops[position]
        fed = {position}
        for later in range(position + 1, len(self.ops)):
            if any(p is not None and p[0] in fed for p in self.ops[later].producers):
                fed.add(later)
        shapes = {core_shape(tuple(t.shape)): p for p in sorted(fed, reverse=True)
                  for t in self.ops[p].outputs}
        reads = [t for j, t in enumerate(op.inputs) if op.producers[j] is not None]
        for r, ref in enumerate(self.reference):
            if ref.step or not ref.outputs or core_shape(tuple(ref.outputs[0].shape)) not in \
                    shapes:
                continue
            if any(t.shape == u.shape and not measure(t, u, self.tolerance).differs
                   for t in reads for u in ref.inputs):
                return r, shapes[core_shape(tuple(ref.outputs[0].shape))]
        return None

    def operands(self, op: OpCall, ref: OpCall | None) -> list[Operand]:
        rows = []
        pairs: list[tuple[str, str, torch.Tensor, str, torch.Tensor | None]] = []
        for j, tensor in enumerate(op.inputs[:_OPERANDS]):
            other = ref.inputs[j] if ref is not None and j < len(ref.inputs) else None
            pairs.append((f"in {j}", operand_name(self.ops, op, j), tensor,
                          operand_name(self.reference, ref, j) if other is not None
                          and ref is not None else "", other))
        for k, tensor in enumerate(op.outputs[:_OPERANDS]):
            other = ref.outputs[k] if ref is not None and k < len(ref.outputs) else None
            name = op.output_names[k] if k < len(op.output_names) else ""
            ref_name = (ref.output_names[k] if ref is not None and k < len(ref.output_names)
                        else "")
            name, ref_name = name or op.step, ref_name or (ref.step if ref is not None else "")
            pairs.append(("out" if len(op.outputs) == 1 else f"out {k}", name or "output",
                          tensor, (ref_name or "output") if other is not None else "", other))
        for role, name, tensor, ref_name, other in pairs:
            diff = None if other is None else measure(tensor, other, self.tolerance)
            rows.append(Operand(role=role, name=name, shape=tuple(tensor.shape),
                                dtype=dtype_name(tensor.dtype),
                                reference_name=ref_name,
                                reference_shape=None if other is None else tuple(other.shape),
                                max_abs=None if diff is None else diff.max_abs,
                                status="" if diff is None else diff.status))
        return rows


def blame(ops: list[OpCall], returned: Sequence[tuple[int, int] | None],
          reference: list[OpCall], tolerance: Tolerance) -> OpBlame | None:
    """The op that made the difference (see the module docstring), or None when no single op
    can be blamed. ``returned``: the model ops that made what the module call returned."""
    search = _Blame(ops, reference, tolerance)
    position = search.frontier(returned)
    if position is None:
        return None
    op = ops[position]
    r = search.counterpart(position)
    ref = reference[r] if r is not None else None
    diff = worst_difference(op.outputs, ref.outputs, tolerance) if ref is not None else None
    operands = search.operands(op, ref)
    weights = [op.parameters[j] for j in range(len(op.inputs))
               if op.producers[j] is None and op.parameters[j]
               and not search.values.holds(op.inputs[j], leaf=True)]
    paired = OpBlame(kind="op", op=op.shown, reference_op=ref.shown if ref is not None else "",
                     source=op.source, reference_source=ref.source if ref is not None else "",
                     diff=diff, inputs_differed=False, detail="", operands=operands)
    if weights:
        return dataclasses.replace(
            paired, kind="weights", inputs_differed=True,
            detail=f"{_called(op)} at {op.source} reads the parameter `{weights[0]}`, which "
                   f"already differs from the reference's (a weight loaded without its "
                   f"transpose?)")
    if ref is None or r is None:
        return _unpaired(search, position)
    differing = [j for j in range(min(len(op.inputs), len(ref.inputs)))
                 if measure(op.inputs[j], ref.inputs[j], tolerance).differs]
    if not differing:
        kind = "shape" if diff is not None and diff.status == "shape" else "op"
        what = ("its output has another shape" if kind == "shape"
                else "its inputs agree and its output does not")
        if ref.step:  # the reference does it inside a fused op: say which step
            what += f" (the reference's {_called(ref)} at {ref.source})"
        return dataclasses.replace(paired, kind=kind,
                                   detail=f"{_called(op)} at {op.source}: {what}")
    j = differing[0]
    chain = search.skipped(r, j, op.inputs[j])
    if not chain:
        return dataclasses.replace(
            paired, inputs_differed=True,
            detail=f"{_called(op)} at {op.source}: its input {j} is not what the reference's "
                   f"{_called(ref)} at {ref.source} reads")
    missing = reference[chain[-1]]
    return dataclasses.replace(
        paired, kind="missing-op", source=search.blamed_line(position, j, missing),
        reference_op=missing.shown,
        reference_source=missing.source,
        detail=f"your model skips {_called(missing)}, which the reference does at "
               f"{missing.source}")


def _unpaired(search: _Blame, position: int) -> OpBlame:
    """The model's op has no counterpart by name: a fused op in the reference computes what
    it starts, or the model does something the reference does not."""
    op = search.ops[position]
    skipped = search.skipped_before(position)
    if skipped is not None:
        r, j = skipped
        missing = search.reference[r]
        return OpBlame(kind="missing-op", op=op.shown, reference_op=missing.shown,
                       source=search.blamed_line(position, j, missing),
                       reference_source=missing.source, diff=None, inputs_differed=False,
                       operands=search.operands(op, missing),
                       detail=f"your model skips {_called(missing)}, which the reference does "
                              f"at {missing.source}")
    fused = search.fused(position)
    if fused is not None:
        ref, end = search.reference[fused[0]], search.ops[fused[1]]
        diff = worst_difference(end.outputs, ref.outputs, search.tolerance)
        lines = op.source if end.source == op.source else f"{op.source} to {end.source}"
        return OpBlame(kind="op", op=op.shown, reference_op=ref.shown, source=op.source,
                       reference_source=ref.source, diff=diff, inputs_differed=False,
                       operands=search.operands(end, ref),
                       detail=f"the ops at {lines} ({_called(op)} to {_called(end)}) compute "
                              f"what the reference's `{ref.shown}` at {ref.source} computes in "
                              f"one call, and their result differs")
    shapes = ", ".join(str(tuple(t.shape)) for t in op.outputs)
    return OpBlame(kind="extra-op", op=op.shown, reference_op="", source=op.source,
                   reference_source="", diff=None, inputs_differed=False,
                   operands=search.operands(op, None),
                   detail=f"{_called(op)} at {op.source} (output {shapes}) has no counterpart "
                          f"in the reference")

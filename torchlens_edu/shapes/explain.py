"""Explain a failed forward in the learner's terms: which op, which tensors, what was expected.

torch's message says *what* broke (``mat1 and mat2 shapes cannot be multiplied (16x16 and
32x64)``); the explanation adds *where* (the user's source line), *which tensors* (by their
names on that line or their parameter names, with named dimensions) and *what would have
worked*. It is added to the original exception (``add_note``; on Python 3.10, appended to its
message), which is then re-raised unchanged in type.
"""

from __future__ import annotations

import ast
import contextlib
import math
import re
import sys
from dataclasses import dataclass, field, replace
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.nn as nn

from torchlens_edu._core.formatting import dtype_name
from torchlens_edu._core.frames import is_user_file, source_location
from torchlens_edu._core.sites import Site, source_text
from torchlens_edu.dims import AxisRoles, Dims, parameter_axes
from torchlens_edu.shapes.meta import DATA_DEPENDENT

_NAMESPACES = frozenset({"torch", "F", "nn.functional", "torch.nn.functional", "torch.linalg"})
_HAS_NOTES = sys.version_info >= (3, 11)  # a test turns it off to try the 3.10 path
_MATMUL = frozenset({"@", "matmul", "bmm", "mm", "mv", "baddbmm", "addmm", "addmv", "einsum"})


@dataclass(kw_only=True)
class Failure:
    """What the tracer saw of an error: the op (op-level and meta runs) and where it ran."""

    exc: BaseException
    op: str | None = None
    operands: list[torch.Tensor] = field(default_factory=list)
    module: str | None = None
    site: Site | None = None  # the user's line, when the op recorder saw it
    equation: str = ""  # einsum's subscripts, when the op recorder saw the call
    meta: bool = False
    explanation: str = ""


@dataclass(frozen=True, kw_only=True)
class _Operand:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device | None  # None: known from the trace's shapes only
    axes: AxisRoles | None = None  # a weight's axes, from its module (wpe.weight: (ctx, C))


def explain(failure: Failure, trace: Any, roots: list[nn.Module]) -> str:
    """The explanation as plain text (a few short lines), for an exception note."""
    dims: Dims = trace.dims
    frame, filename, line = _user_line(failure)
    code = source_text(filename, line) if filename else ""
    named = _tensors_on_line(frame, code) if frame is not None else {}
    axes = trace.axes  # the roles of the weights' axes, by id (op and meta runs)
    operands = [_operand(t, _name_of(t, named, roots), axes.get(id(t)))
                for t in failure.operands]
    texts = _operand_texts(code, failure.op)  # an expression such as k.transpose(-2, -1)
    operands = [replace(o, name=texts[i]) if o.name == "tensor" and i < len(texts) else o
                for i, o in enumerate(operands)]
    if failure.op == "einsum" or not failure.equation:
        failure.equation = failure.equation or _einsum_equation(code)
    if not operands:  # a module-level trace: a failing layer's inputs, or the line's tensors
        operands = _leaf_operands(failure.module, trace, roots)
    on_line = not operands
    if on_line:
        operands = [_operand(t, name) for name, t in named.items()]
    message = str(failure.exc).strip().splitlines()[0] if str(failure.exc).strip() else ""
    expected, hint = _expectation(failure, operands, message, dims)

    where = ""
    if failure.module is not None and roots:
        module = dict(roots[0].named_modules()).get(failure.module)
        kind = type(module).__name__ if module is not None else "?"
        where = f" in {failure.module} ({kind})" if failure.module else f" in {kind}.forward"
    what = f"`{failure.op}`" if failure.op else "the forward"
    lines = [f"torchlens_edu: {what} failed{where}"]
    if filename:
        lines.append(f"  at {source_location(filename, line)}  {code}")
    if operands:
        lines.append("  tensors on that line:" if on_line else "  operands:")
        width = max(len(o.name) for o in operands)
        for o in operands:
            device = f" {o.device}" if o.device is not None else ""
            shape = dims.format(o.shape, axes=o.axes, dtype=o.dtype)
            lines.append(f"    {o.name:<{width}}  {shape}  "
                         f"{dtype_name(o.dtype)}{device}")
    if expected:
        lines.append(f"  expected: {expected}")
    if hint:
        lines.append(f"  hint: {hint}")
    return "\n".join(lines)


def add_context(exc: BaseException, text: str, trace: Any) -> None:
    """Attach the explanation and the partial trace to ``exc`` without changing its type."""
    note = f"{text}\n  the trace up to the failure: exc.shape_trace ({len(trace)} events)"
    if sys.version_info >= (3, 11) and _HAS_NOTES:  # the version check speaks to mypy
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):  # Python 3.10: extend the message itself
        exc.args = (f"{exc.args[0]}\n\n{note}", *exc.args[1:])
    # An exception type with __slots__ cannot carry the trace; the note still explains.
    with contextlib.suppress(AttributeError, TypeError):
        exc.shape_trace = trace  # type: ignore[attr-defined]


# --- where and which tensors ------------------------------------------------------------------

def _user_line(failure: Failure) -> tuple[FrameType | None, str, int]:
    """The user frame of the failing line (from the traceback), its file and line number."""
    entries: list[tuple[FrameType, int]] = []
    tb: TracebackType | None = failure.exc.__traceback__
    while tb is not None:
        entries.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    site = failure.site
    if site is not None:
        for frame, line in reversed(entries):
            if (frame.f_code.co_filename, line) == (site.filename, site.line):
                return frame, site.filename, site.line
        return None, site.filename, site.line
    for frame, line in reversed(entries):
        if is_user_file(frame.f_code.co_filename):
            return frame, frame.f_code.co_filename, line
    # all of it ran in library code (PyTorch's own nn.TransformerEncoderLayer calling its
    # linear1): the user's line is the one that ran the model, above the traceback
    caller = entries[0][0].f_back if entries else None
    while caller is not None:
        if is_user_file(caller.f_code.co_filename):
            return caller, caller.f_code.co_filename, caller.f_lineno
        caller = caller.f_back
    return None, "", 0


def _tensors_on_line(frame: FrameType, code: str) -> dict[str, torch.Tensor]:
    """``name -> tensor`` for the names (and ``self.attr`` chains) the line mentions."""
    names: list[str] = []
    try:
        tree = ast.parse(code.rstrip(":").strip() or "None")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names.append(f"{node.value.id}.{node.attr}")
            elif isinstance(node, ast.Name):
                names.append(node.id)
    except SyntaxError:  # a line of a longer statement: take the identifiers it shows
        names = re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?", code)
    found: dict[str, torch.Tensor] = {}
    scope = frame.f_locals
    for name in dict.fromkeys(sorted(names, key=code.find)):
        base, _, attr = name.partition(".")
        value = scope.get(base)
        if attr:  # only a module's own attributes: reading them runs no user code
            value = _module_attr(value, attr)
        if isinstance(value, torch.Tensor) and all(value is not t for t in found.values()):
            found[name] = value
    return found


def _operand_texts(code: str, op: str | None) -> list[str]:
    """The source text of the failing call's operands on the line (``k.transpose(-2, -1)`` in
    ``q @ k.transpose(-2, -1)``), in the order torch sees them; ``[]`` when unclear."""
    try:
        tree = ast.parse(code.rstrip(":").strip() or "None")
    except SyntaxError:
        return []
    for node in ast.walk(tree):
        if op in ("@", "matmul") and isinstance(node, ast.BinOp) and \
                isinstance(node.op, ast.MatMult):
            return [ast.unparse(node.left), ast.unparse(node.right)]
        if isinstance(node, ast.Call) and op is not None and \
                getattr(node.func, "attr", getattr(node.func, "id", None)) == op:
            args = [ast.unparse(a) for a in node.args if not isinstance(a, ast.Constant)]
            owner = node.func.value if isinstance(node.func, ast.Attribute) else None
            if owner is not None and ast.unparse(owner) not in _NAMESPACES:
                return [ast.unparse(owner), *args]  # a method: x.reshape(B, T, C)
            return args  # a function: torch.einsum("...", q, k)
    return []


def _module_attr(obj: Any, attr: str) -> Any:
    if not isinstance(obj, nn.Module):
        return None
    for table in (obj._parameters, obj._buffers, obj.__dict__):
        if attr in table:
            return table[attr]
    return None


def _name_of(tensor: torch.Tensor, named: dict[str, torch.Tensor], roots: list[nn.Module]) -> str:
    for name, value in named.items():
        if value is tensor:
            return name
    for root in roots:
        for name, param in [*root.named_parameters(), *root.named_buffers()]:
            if param is tensor:
                return name
    return "tensor"


def _leaf_operands(path: str | None, trace: Any, roots: list[nn.Module]) -> list[_Operand]:
    """A failing layer without submodules (Linear, Embedding, ...): its inputs, as the trace
    recorded them, and its own parameters: the operands of the op that failed inside it."""
    if path is None:
        return []
    for root in roots:
        module = dict(root.named_modules()).get(path)
        if module is None or next(module.children(), None) is not None:
            continue
        event = next((e for e in reversed(trace.events) if e.kind == "module" and e.path == path),
                     None)
        inputs = [_Operand(name="input", shape=tuple(shape), dtype=dtype, device=None)
                  for shape, dtype in (event.inputs if event is not None else ())]
        prefix = f"{path}." if path else ""
        module_name = path.rsplit(".", 1)[-1]
        params = [_operand(t, prefix + name, parameter_axes(module_name, module, name, t.dim()))
                  for name, t in [*module.named_parameters(recurse=False),
                                  *module.named_buffers(recurse=False)] if t is not None]
        return inputs + params
    return []


def _operand(tensor: torch.Tensor, name: str, axes: AxisRoles | None = None) -> _Operand:
    return _Operand(name=name, shape=tuple(tensor.shape), dtype=tensor.dtype, axes=axes,
                    device=tensor.device)


# --- what was expected ------------------------------------------------------------------------

def _expectation(failure: Failure, ops: list[_Operand], message: str, dims: Dims
                 ) -> tuple[str, str]:
    low = message.lower()
    if failure.meta and (failure.op in DATA_DEPENDENT or "meta" in low
                         or isinstance(failure.exc, NotImplementedError)):
        # Inputs and what is computed from them alone stay real in a meta run; what failed
        # here read the values of a tensor that came from the weights.
        op = f"`{failure.op}`" if failure.op else "this line"
        if failure.op in DATA_DEPENDENT:
            return (f"{op} reads the values of a tensor computed from the weights, and a meta "
                    "(shape-only) run has shapes only",
                    "this line needs values: trace with meta=False on a small input, or move "
                    "the check out of the forward")
        return (f"ops that run on meta tensors; {op} has no meta version or reads values",
                "this line needs values or a real device: trace with meta=False on a small "
                "input")
    if "device" in low and ("same device" in low or "expected device" in low
                            or "two devices" in low):
        devices = sorted({str(o.device) for o in ops if o.device is not None})
        return (f"all operands on one device (found {', '.join(devices) or 'several'})",
                "move them together: model.to(device) and x.to(device), or create new tensors "
                "with device=x.device")
    if "dtype" in low or "scalar type" in low or "floattensor" in low:
        return _dtype_expectation(ops, low)
    name = failure.op or ""
    if name == "einsum" or "einsum()" in low:
        return _einsum_expectation(failure.equation, ops, message, dims)
    if ("cannot be multiplied" in low or "batch2 tensor" in low or "same reduction dim" in low
            or "size mismatch, got input" in low  # matrix @ vector
            or name in _MATMUL or name == "linear"):  # the last: meta kernels' own words
        return _matmul_expectation(name, ops, dims)
    if "must match the size of tensor" in low:
        return _broadcast_expectation(ops, dims)
    match = re.search(r"range of \[-?\d+, (-?\d+)\], but got (-?\d+)", message)
    if match or "unbatched" in low or "batch axis" in low:
        ndim = int(match.group(1)) + 1 if match else None
        asked = int(match.group(2)) if match else None
        missing = asked is not None and ndim is not None and asked >= ndim
        got = f"a tensor with {ndim} axes, but the code uses axis {asked}" if match else ""
        return (got or "a batch axis in front", "a batch axis is probably missing: add it with "
                "x.unsqueeze(0) or x[None]" if missing or not match else "")
    reshape = re.search(r"shape '\[([-\d, ]*)\]' is invalid for input of size (\d+)", message)
    if reshape:
        given = [int(v) for v in reshape.group(1).split(",") if v.strip()]
        return _reshape_expectation(given, int(reshape.group(2)), ops, dims)
    if "view size is not compatible" in low:
        return ("a contiguous tensor for .view() (transpose/permute made it non-contiguous)",
                "use .reshape(...) or .contiguous().view(...)")
    if "normalized_shape" in low:
        shape = re.search(r"normalized_shape=\[([\d, ]+)\]", message)
        return (f"the input's last axes to be [{shape.group(1) if shape else '...'}]",
                "check that the features are on the last axis")
    if name in _LOSSES or "expected target size" in low or "match target batch_size" in low:
        return _loss_expectation(name or "cross_entropy", ops, dims)
    joined = _join_expectation(name, ops, message, dims)
    if joined[0]:
        return joined
    bounds = re.search(r"index (-?\d+) is out of bounds for dimension (\d+) with size (\d+)",
                       message)
    if bounds:
        index, axis, size = (int(v) for v in bounds.groups())
        label = _label(dims, ops[0].shape, axis) if ops and len(ops[0].shape) > axis else str(size)
        on = f"{ops[0].name}'s axis {axis} ({label})" if ops else f"axis {axis} (size {size})"
        return (f"an index from 0 to {size - 1} (or -{size} to -1) along {on}; {index} is "
                "past the end",
                "Python counts from 0: the last position is -1 (or size - 1)")
    expand = re.search(r"expanded size of the tensor \((-?\d+)\) must match the existing size "
                       r"\((\d+)\) at non-singleton dimension (\d+)", message)
    if expand:
        target, existing, axis = (int(v) for v in expand.groups())
        return (f"expand to stretch only axes of size 1: axis {axis} has size {existing}, which "
                f"cannot become {target}",
                "use .repeat(...) to copy the data along an axis, or check the target sizes")
    return "", ""


_LOSSES = frozenset({"cross_entropy", "nll_loss"})


def _loss_expectation(name: str, ops: list[_Operand], dims: Dims) -> tuple[str, str]:
    """cross_entropy / nll_loss: the classes go on axis 1, the target has no class axis."""
    expected = (f"{name}(input, target) takes the class scores with the classes on axis 1: "
                "input (N, C) with target (N,), or input (N, C, d1, ...) with target (N, d1, ...)")
    if len(ops) < 2:
        return expected, ""
    scores, target = ops[0], ops[1]
    if len(scores.shape) == 3 and scores.shape[:2] == target.shape[:2] and (
            len(target.shape) == 2):
        return expected, (f"{scores.name} {dims.format(scores.shape)} has its classes last: "
                          f"flatten the tokens, {name}({scores.name}.view(-1, "
                          f"{scores.name}.size(-1)), {target.name}.view(-1)) as nanoGPT does, "
                          f"or move the classes to axis 1 with {scores.name}.transpose(1, 2)")
    if len(scores.shape) == 2 and len(target.shape) > 1 and (
            math.prod(target.shape) == scores.shape[0]):
        return expected, (f"flatten {target.name} too: {target.name}.view(-1) gives one target "
                          f"per row of {scores.name}")
    if len(scores.shape) > 2 and len(target.shape) == 1 and (
            math.prod(scores.shape[:-1]) == target.shape[0]):
        return expected, (f"flatten {scores.name} too: {scores.name}.view(-1, "
                          f"{scores.name}.size(-1)) gives one row per target")
    return expected, ""


def _join_expectation(name: str, ops: list[_Operand], message: str, dims: Dims
                      ) -> tuple[str, str]:
    """cat / stack: which tensor differs from the first, on which axis."""
    ranks = re.search(r"same number of dimensions: got (\d+) and (\d+)", message)
    if ranks:
        return (f"tensors with the same number of axes to join (got {ranks.group(1)} and "
                f"{ranks.group(2)})", "add the missing axis first, e.g. x.unsqueeze(-1)")
    sizes = re.search(r"Sizes of tensors must match except in dimension (-?\d+)\. Expected size "
                      r"(\d+) but got size (\d+) for tensor number (\d+)", message)
    if sizes:
        along, want, got, index = (int(v) for v in sizes.groups())
        first = ops[0] if ops else None
        other = ops[index] if index < len(ops) else None
        clash = ""
        if first is not None and other is not None and len(first.shape) == len(other.shape):
            axis = next((k for k in range(len(first.shape)) if k != along
                         and (first.shape[k], other.shape[k]) == (want, got)), None)
            if axis is not None:
                clash = (f": {first.name} has {_label(dims, first.shape, axis)} on axis {axis}, "
                         f"{other.name} has {got}")
        return (f"every axis but the joined one (dim={along}) equal in all the tensors{clash}",
                "join along the axis where they differ (dim=...), or make the other axes "
                "equal first (e.g. crop to the shorter)")
    if "stack expects each tensor to be equal size" in message:
        shapes = "; ".join(f"{o.name} {dims.format(o.shape)}" for o in ops[:3])
        return (f"tensors of one shape for stack, which adds a new axis: {shapes or '?'}",
                "to join along an existing axis use torch.cat; else make the shapes equal first")
    return "", ""


def _label(dims: Dims, shape: tuple[int, ...], axis: int, axes: AxisRoles | None = None) -> str:
    return dims.labels(shape, axes)[axis] if shape and -len(shape) <= axis < len(shape) else "?"


def _matmul_ok(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether ``a @ b`` works for these shapes (2-D and more)."""
    if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        return False
    return not _batch_clashes(a, b)


def _batch_clashes(a: tuple[int, ...], b: tuple[int, ...]) -> list[int]:
    """Axes (negative, from the right) of the batch part (all but the last two) that do not
    broadcast: sizes differ and neither is 1."""
    return [-k for k in range(3, min(len(a), len(b)) + 1)
            if a[-k] != b[-k] and 1 not in (a[-k], b[-k])]


def _swapped(shape: tuple[int, ...], i: int, j: int) -> tuple[int, ...]:
    out = list(shape)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


def _matmul_expectation(name: str, ops: list[_Operand], dims: Dims) -> tuple[str, str]:
    if len(ops) < 2:
        return "", ""
    a, b = ops[0], ops[1]
    if name == "linear" or (len(b.shape) == 2 and b.name.endswith("weight")):
        return (f"the input's last axis ({_label(dims, a.shape, -1)}) equal to the layer's "
                f"in_features ({_label(dims, b.shape, -1, b.axes)})",
                "put the features on the last axis, or build the layer for this size")
    if len(a.shape) >= 1 and len(b.shape) == 1:  # matrix @ vector
        return (f"a @ v needs a's last axis ({_label(dims, a.shape, -1)}) to equal v's length "
                f"({_label(dims, b.shape, -1)})", "")
    if len(a.shape) < 1 or len(b.shape) < 2:
        return "", ""
    inner = (f"a's last axis ({_label(dims, a.shape, -1)}) to equal b's second-to-last axis "
             f"({_label(dims, b.shape, -2)})")
    clashes = _batch_clashes(a.shape, b.shape)
    if clashes:  # the matrices may fit: the axes in front of them do not
        axes = "; ".join(f"axis {k}: {_label(dims, a.shape, k)} vs {_label(dims, b.shape, k)}"
                         for k in clashes)
        expected = ("a @ b needs batch axes (all but the last two) that broadcast, each equal "
                    f"or 1: {axes}")
        if a.shape[-1] != b.shape[-2]:
            expected += f"; and {inner}"
        return expected, _batch_hint(a, b, clashes)
    expected = f"a @ b needs {inner}"
    if a.shape[-1] == b.shape[-1]:
        return expected, f"{b.name}'s last axis matches: did you mean {b.name}.transpose(-2, -1)?"
    if len(a.shape) >= 2 and a.shape[-2] == b.shape[-2]:
        return expected, f"did you mean {a.name}.transpose(-2, -1) @ {b.name}?"
    return expected, ""


def _batch_hint(a: _Operand, b: _Operand, clashes: list[int]) -> str:
    """A fix that makes the shapes work, when one is simple: a head axis moved to the front,
    or k/v heads repeated for grouped-query attention."""
    for who, swap in ((a, lambda s: (_swapped(s, -3, -2), b.shape)),
                      (b, lambda s: (a.shape, _swapped(s, -3, -1)))):
        if len(who.shape) >= 4 and _matmul_ok(*swap(who.shape)):
            axes = "(1, 2)" if len(who.shape) == 4 else "(-3, -2)"
            return (f"{who.name} has its heads on the wrong axis (e.g. (B, T, nh, hs) instead "
                    f"of (B, nh, T, hs)): {who.name}.transpose{axes} after the view")
    if clashes == [-3] and len(a.shape) >= 4:
        big, small = sorted((a, b), key=lambda o: o.shape[-3], reverse=True)
        if small.shape[-3] and big.shape[-3] % small.shape[-3] == 0:
            group = big.shape[-3] // small.shape[-3]
            return (f"{small.name} has {group}x fewer heads than {big.name} (grouped-query "
                    f"attention): repeat its heads first, e.g. "
                    f"{small.name}.repeat_interleave({group}, dim=-3)")
    return ""


def _einsum_equation(code: str) -> str:
    """The subscripts of the first ``einsum("...", ...)`` on a line of code, or ``""``."""
    found = re.search(r"einsum\(\s*[rbuf]?[\"']([^\"']+)[\"']", code)
    return found.group(1) if found else ""


def _einsum_expectation(equation: str, ops: list[_Operand], message: str, dims: Dims
                        ) -> tuple[str, str]:
    """einsum failures by their subscripts: which letter means two sizes, in which operands."""
    spec = equation.replace(" ", "")
    inputs = spec.split("->")[0].split(",") if spec else []
    if inputs and "." not in spec and len(inputs) == len(ops):
        for term, op in zip(inputs, ops, strict=True):
            if len(term) != len(op.shape):
                return (f"einsum('{equation}'): '{term}' names {len(term)} axes, but {op.name} "
                        f"has {len(op.shape)} {dims.format(op.shape)}",
                        "one letter per axis: add or drop letters (or reshape the operand)")
        seen: dict[str, tuple[_Operand, int]] = {}
        for term, op in zip(inputs, ops, strict=True):
            for axis, letter in enumerate(term):
                size = op.shape[axis]
                if letter not in seen or seen[letter][0].shape[seen[letter][1]] == 1:
                    seen[letter] = (op, axis)
                    continue
                first, first_axis = seen[letter]
                before = first.shape[first_axis]
                if size not in (before, 1):
                    expected = (f"einsum('{equation}'): subscript {letter} is one size in every "
                                f"operand, but it is {_label(dims, first.shape, first_axis)} in "
                                f"{first.name} and {_label(dims, op.shape, axis)} in {op.name}")
                    hint = ""
                    big, small = max(before, size), min(before, size)
                    if big % small == 0:
                        fewer = op if size < before else first
                        more = first if fewer is op else op
                        at = axis if fewer is op else first_axis
                        hint = (f"{fewer.name} has {big // small}x fewer along {letter} than "
                                f"{more.name} (grouped-query attention?): repeat it first, e.g. "
                                f"{fewer.name}.repeat_interleave({big // small}, dim={at})")
                    return expected, hint
    clash = re.search(r"subscript (\w) has size (\d+) for operand (\d+) which does not "
                      r"broadcast with previously seen size (\d+)", message)
    if clash:
        subscript, got, index, earlier = clash.groups()
        return (f"einsum subscript {subscript} to be one size: it is {earlier} in an earlier "
                f"operand and {got} in operand {index}", "")
    return "", ""


def _reshape_expectation(given: list[int], numel: int, ops: list[_Operand], dims: Dims
                         ) -> tuple[str, str]:
    """view/reshape: the sizes given, the number of elements they hold and the input's."""
    source = next((o for o in ops if math.prod(o.shape) == numel), None)
    of_input = f"{source.name} {dims.format(source.shape)}" if source else "the input"
    shown = "(" + ", ".join(map(str, given)) + ")"
    known = math.prod(v for v in given if v != -1)
    if -1 in given:
        return (f"sizes next to -1 that divide {of_input}'s {numel} elements: {shown} leaves -1 "
                f"= {numel} / {known}, not a whole number",
                "-1 is computed from the other sizes, so one of those is wrong: compare them with "
                f"{of_input}")
    expected = f"as many elements as {of_input}: {numel}; {shown} holds {known}"
    lead = given[:-1]
    if lead and numel % math.prod(lead) == 0:
        merged = (*lead, numel // math.prod(lead))
        return expected, (f"to merge the trailing axes let -1 compute the last size: "
                          f"({', '.join(map(str, lead))}, -1) gives "
                          f"{dims.format(merged)}")
    return expected, f"the sizes must multiply to {numel}"


def _broadcast_expectation(ops: list[_Operand], dims: Dims) -> tuple[str, str]:
    if len(ops) < 2:
        return "shapes that broadcast: lined up from the right, each axis equal or 1", ""
    a, b = ops[0], ops[1]
    clashes = []
    for k in range(1, min(len(a.shape), len(b.shape)) + 1):
        x, y = a.shape[-k], b.shape[-k]
        if x != y and 1 not in (x, y):
            clashes.append(f"axis -{k}: {_label(dims, a.shape, -k)} vs {_label(dims, b.shape, -k)}")
    expected = ("shapes that broadcast (lined up from the right, each axis equal or 1); "
                + "; ".join(clashes))
    mask = next((o for o in ops[:2] if o.dtype == torch.bool), None)
    if mask is None:
        return expected, ""
    other = b if mask is a else a
    what = mask.name if "mask" in mask.name.lower() else f"the mask {mask.name}"
    if mask.shape and other.shape and mask.shape[-1] > other.shape[-1]:  # keys: longer
        return expected, (f"{what} looks built for a longer sequence (the context size?): crop "
                          "it to this one, as nanoGPT does with bias[:, :, :T, :T]")
    return expected, (f"{what} looks built for another length: build it from the current "
                      "sizes (e.g. torch.ones(T, T, dtype=torch.bool).tril())")


def _dtype_expectation(ops: list[_Operand], low: str) -> tuple[str, str]:
    kinds = ", ".join(f"{o.name}: {dtype_name(o.dtype)}" for o in ops)
    if "indices" in low:
        return ("integer indices (torch.long) for an embedding or index op",
                "token ids must be integers: use ids.long()")
    if "boolean mask" in low:
        return "a boolean mask", "use mask.bool() (or build it with a comparison such as x > 0)"
    floats = [o for o in ops if o.dtype.is_floating_point]
    ints = [o for o in ops if not o.dtype.is_floating_point and o.dtype != torch.bool]
    if floats and ints:
        target = dtype_name(floats[0].dtype)
        return (f"operands of one dtype ({kinds})",
                f"convert the integer tensor: {ints[0].name}.to(torch.{target})")
    if len({o.dtype for o in ops}) > 1:
        target = dtype_name(ops[-1].dtype)
        return f"operands of one dtype ({kinds})", f"convert one of them, e.g. .to(torch.{target})"
    return "another dtype", ""

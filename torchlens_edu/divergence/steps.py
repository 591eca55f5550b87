"""The steps of a fused op, so that it can be compared with the same computation written out.

``F.scaled_dot_product_attention`` on one side and ``q @ k.transpose(-2, -1) / sqrt(hs)``,
a mask, a softmax and ``@ v`` on the other compute the same thing; so do ``F.gelu`` and its
tanh formula, ``F.layer_norm`` and a hand-written mean/var, ``F.linear`` and ``x @ w.T + b``.
When only one side calls a fused op, its call is replaced by its steps, computed here from
the arguments it was called with (kept by ``ops.py``), each a step of the fused op on the
fused op's line. The steps are kept only when the last one reproduces the fused op's output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchlens_edu.divergence.ops import OpCall
from torchlens_edu.divergence.tolerance import Tolerance, measure
from torchlens_edu.shapes.ops import tensors_in

# a step's operand: ("in", i) the fused op's i-th tensor operand, ("step", n) step n's output,
# None a constant the step makes itself (a causal mask)
Source = tuple[str, int] | None


class _Steps:
    """The steps of one fused call, as they are computed."""

    def __init__(self, operands: Sequence[torch.Tensor]) -> None:
        self.steps: list[tuple[str, str, list[Source], list[torch.Tensor], torch.Tensor]] = []
        self._sources: dict[int, Source] = {id(t): ("in", i) for i, t in enumerate(operands)}

    def add(self, name: str, label: str, inputs: Sequence[torch.Tensor],
            output: torch.Tensor) -> torch.Tensor:
        """Step ``name`` (as the op recorder would name the op a learner writes for it) that
        computes ``label`` from ``inputs``."""
        self.steps.append((name, label, [self._sources.get(id(t)) for t in inputs],
                           list(inputs), output))
        self._sources[id(output)] = ("step", len(self.steps) - 1)
        return output


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str,
              default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _attention(s: _Steps, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    q, k, v = (_argument(args, kwargs, i, n, None) for i, n in enumerate(("query", "key",
                                                                          "value")))
    mask = _argument(args, kwargs, 3, "attn_mask", None)
    if float(_argument(args, kwargs, 4, "dropout_p", 0.0)) > 0 or k.shape[-3:-2] != q.shape[-3:-2]:
        return False  # dropout draws its own numbers; grouped heads: not written out here
    causal = bool(_argument(args, kwargs, 5, "is_causal", False))
    scale = _argument(args, kwargs, 6, "scale", None)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    L, S = q.shape[-2], k.shape[-2]
    kt = s.add("transpose", "kᵀ", [k], k.transpose(-2, -1))  # (B, nh, hs, S)
    scores = s.add("matmul", "q @ kᵀ", [q, kt], q @ kt)  # (B, nh, L, S)
    scores = s.add("div", "q @ kᵀ * scale", [scores], scores * scale)
    if causal:
        ones = s.add("ones", "ones (L, S)", [], torch.ones(L, S, dtype=torch.bool,
                                                           device=q.device))
        mask = s.add("tril", "the causal mask", [ones], ones.tril())  # (L, S)
    if mask is not None and mask.dtype == torch.bool:
        hidden = s.add("bitwise_not", "~mask", [mask], ~mask)
        scores = s.add("masked_fill", "scores with -inf where masked", [scores, hidden],
                       scores.masked_fill(hidden, float("-inf")))
    elif mask is not None:
        scores = s.add("add", "scores + mask", [scores, mask], scores + mask)
    att = s.add("softmax", "softmax(scores)", [scores], scores.softmax(-1))  # (B, nh, L, S)
    s.add("matmul", "att @ v", [att, v], att @ v)  # (B, nh, L, hs)
    return True


def _gelu(s: _Steps, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    x = _argument(args, kwargs, 0, "input", None)
    half = s.add("mul", "0.5 * x", [x], 0.5 * x)
    tanh = _argument(args, kwargs, 1, "approximate", "none") == "tanh"
    if tanh:
        cube = s.add("pow", "x ** 3", [x], x ** 3)
        inner = s.add("mul", "0.044715 * x ** 3", [cube], 0.044715 * cube)
        inner = s.add("add", "x + 0.044715 * x ** 3", [x, inner], x + inner)
        inner = s.add("mul", "sqrt(2 / pi) * (...)", [inner], math.sqrt(2 / math.pi) * inner)
        curve = s.add("tanh", "tanh(...)", [inner], inner.tanh())
    else:
        scaled = s.add("div", "x / sqrt(2)", [x], x / math.sqrt(2))
        curve = s.add("erf", "erf(x / sqrt(2))", [scaled], scaled.erf())
    gate = s.add("add", f"1 + {'tanh' if tanh else 'erf'}(...)", [curve], 1 + curve)
    s.add("mul", "0.5 * x * (1 + ...)", [half, gate], half * gate)
    return True


def _layer_norm(s: _Steps, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    x = _argument(args, kwargs, 0, "input", None)
    axes = tuple(range(-len(_argument(args, kwargs, 1, "normalized_shape", ())), 0))
    weight = _argument(args, kwargs, 2, "weight", None)
    bias = _argument(args, kwargs, 3, "bias", None)
    eps = float(_argument(args, kwargs, 4, "eps", 1e-5))
    mean = s.add("mean", "mean of x", [x], x.mean(axes, keepdim=True))
    centered = s.add("sub", "x - mean", [x, mean], x - mean)
    s.add("pow", "(x - mean) ** 2", [centered], centered ** 2)
    var = s.add("var", "var of x (biased)", [x], x.var(axes, unbiased=False, keepdim=True))
    var_eps = s.add("add", "var + eps", [var], var + eps)
    std = s.add("sqrt", "sqrt(var + eps)", [var_eps], var_eps.sqrt())
    y = s.add("div", "(x - mean) / sqrt(var + eps)", [centered, std], centered / std)
    if weight is not None:
        y = s.add("mul", "normalized * weight", [y, weight], y * weight)
    if bias is not None:
        s.add("add", "... + bias", [y, bias], y + bias)
    return True


def _linear(s: _Steps, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    x, weight = _argument(args, kwargs, 0, "input", None), _argument(args, kwargs, 1, "weight",
                                                                       None)
    bias = _argument(args, kwargs, 2, "bias", None)
    wt = s.add(".T", "wᵀ", [weight], weight.T)
    y = s.add("matmul", "x @ wᵀ", [x, wt], x @ wt)
    if bias is not None:
        s.add("add", "x @ wᵀ + b", [y, bias], y + bias)
    return True


def _addmm(s: _Steps, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    bias, x, weight = (_argument(args, kwargs, i, n, None) for i, n in enumerate(("input",
                                                                                  "mat1", "mat2")))
    if _argument(args, kwargs, 3, "beta", 1) != 1 or _argument(args, kwargs, 4, "alpha", 1) != 1:
        return False
    y = s.add("matmul", "x @ w", [x, weight], x @ weight)
    s.add("add", "x @ w + b", [y, bias], y + bias)
    return True


def _softmax(s: _Steps, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    x, dim = _argument(args, kwargs, 0, "input", None), _argument(args, kwargs, 1, "dim", None)
    if dim is None or _argument(args, kwargs, 3, "dtype", None) is not None:
        return False
    top = s.add("amax", "max of x", [x], x.amax(dim, keepdim=True))
    shifted = s.add("sub", "x - max", [x, top], x - top)
    e = s.add("exp", "exp(x - max)", [shifted], shifted.exp())
    total = s.add("sum", "sum of exp", [e], e.sum(dim, keepdim=True))
    s.add("div", "exp / sum", [e, total], e / total)
    return True


_STEPS: dict[str, Callable[[_Steps, tuple[Any, ...], dict[str, Any]], bool]] = {
    "scaled_dot_product_attention": _attention, "gelu": _gelu, "layer_norm": _layer_norm,
    "linear": _linear, "addmm": _addmm, "softmax": _softmax,
}


def _steps_of(op: OpCall) -> list[tuple[str, str, list[Source], list[torch.Tensor],
                                         torch.Tensor]] | None:
    if op.arguments is None or len(op.outputs) != 1 or op.name not in _STEPS:
        return None
    args, kwargs = op.arguments
    steps = _Steps(tensors_in(args, kwargs))
    try:
        with torch.no_grad():
            written_out = _STEPS[op.name](steps, args, kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError):  # arguments we do not write out
        return None
    if not written_out or not steps.steps:
        return None
    last = steps.steps[-1][-1]
    if last.shape != op.outputs[0].shape or measure(last, op.outputs[0], Tolerance()).differs:
        return None  # the steps do not reproduce it: keep the fused op as it is
    return steps.steps


def expand_both(ops: list[OpCall], reference: list[OpCall]
                ) -> tuple[list[OpCall], list[OpCall], dict[int, int]]:
    """Both sides with each fused op that only one side calls written out in steps, outer ops
    first (an attention written out has a ``softmax`` step, which then pairs with the other
    side's ``softmax``); and where each of the model's ops went (see :func:`expand`)."""
    moved = {position: position for position in range(len(ops))}
    for name in _STEPS:  # in order: attention, GELU, LayerNorm, linear, addmm, softmax
        mine, theirs = {op.name for op in ops}, {op.name for op in reference}
        if name in mine and name not in theirs:
            ops, step = expand(ops, theirs, only=name)
            moved = {old: step[new] for old, new in moved.items()}
        elif name in theirs and name not in mine:
            reference, _ = expand(reference, mine, only=name)
    return ops, reference, moved


def expand(ops: list[OpCall], keep: set[str], only: str | None = None
           ) -> tuple[list[OpCall], dict[int, int]]:
    """``ops`` with each fused op whose name is not in ``keep`` (the other side calls no op of
    that name; with ``only``, just the ops of that name) replaced by its steps; and where each
    op went (old position -> new position of the op, or of its last step)."""
    expanded: list[OpCall] = []
    moved: dict[int, int] = {}

    for position, op in enumerate(ops):
        steps = None if op.name in keep or only not in (None, op.name) else _steps_of(op)
        if steps is None:
            expanded.append(dataclasses.replace(op, producers=[
                None if p is None else (moved[p[0]], p[1]) for p in op.producers]))
            moved[position] = len(expanded) - 1
            continue
        first = len(expanded)
        for n, (name, label, sources, inputs, output) in enumerate(steps):
            producers, parameters, names = [], [], []
            for source in sources:
                if source is not None and source[0] == "in":
                    i = source[1]
                    made = op.producers[i]
                    producers.append(None if made is None else (moved[made[0]], made[1]))
                    parameters.append(op.parameters[i])
                    names.append(op.names[i] if i < len(op.names) else "")
                else:
                    producers.append(None if source is None else (first + source[1], 0))
                    parameters.append(None)
                    names.append("")
            last = n == len(steps) - 1
            expanded.append(OpCall(
                name=name, source=op.source, inputs=[t.clone() for t in inputs],
                outputs=op.outputs if last else [output], parameters=parameters,
                producers=producers, names=names,
                output_names=op.output_names if last else [""], step=label, fused=op.name))
        moved[position] = len(expanded) - 1
    return expanded, moved

"""Why the producer made a NaN/Inf: the hint, chosen from what the values say.

A hint names a cause only when the numbers around the producer allow it: "log/sqrt of <= 0"
needs an input that was <= 0, "division by ~0" a divisor with zeros, "softmax over a fully
masked row" a row that really was all ``-inf``. Finite inputs that made an Inf where none of
those holds overflowed past the dtype's largest value, and a NaN from finite inputs of such an
op is an overflow too (inf - inf inside it); both are named as overflow, with the dtype and its
limit. The op's name only narrows the candidates; the values decide.

For attention and softmax the summaries (ranges and counts) cannot tell a fully masked row from
an overflow, so :func:`row_facts` looks at the tensors themselves (only in the replay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from torchlens_edu.nans.report import TensorSummary

__all__ = ["HINTS", "RowFacts", "backward_cause", "forward_cause", "hint_for", "row_facts"]

# cause id -> the hint's opening words (the categories a learner meets most)
HINTS: dict[str, str] = {
    "log_sqrt": "log/sqrt of <= 0",
    "domain": "input outside the function's domain",
    "division": "division by ~0",
    "masked_softmax": "softmax over a fully masked row",
    "fp16_overflow": "fp16 overflow above 65504",
    "overflow": "overflow past the dtype's largest value",
    "inf_arith": "NaN from inf - inf or 0 × inf",
    "exploding": "exploding values/learning rate",
    "where_trap": "where-gradient trap",
    "input": "non-finite input",
    "loss": "non-finite gradient from the loss",
    "other_rank": "another rank",
    "not_reproduced": "not reproduced",
}

# NaN below 0, -inf (log) or +inf (rsqrt) at 0
LOG_SQRT_OPS = frozenset({"log", "log2", "log10", "log1p", "sqrt", "rsqrt", "log_", "sqrt_",
                          "rsqrt_", "log2_", "log10_", "log1p_"})
POW_OPS = frozenset({"pow", "pow_", "float_power", "float_power_"})
DOMAIN_OPS = frozenset({"acosh", "atanh", "logit", "lgamma", "digamma", "asin", "acos",
                        "arcsin", "arccos", "arccosh", "arctanh", "polygamma", "erfinv"})
DIVISION_OPS = frozenset({"div", "div_", "true_divide", "divide", "reciprocal", "reciprocal_",
                          "floor_divide", "remainder", "fmod", "truediv", "truediv_"})
SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "softmin", "scaled_dot_product_attention",
                         "multi_head_attention_forward", "logsumexp"})
LOG_SQRT_NODES = ("Sqrt", "Rsqrt", "Log", "Pow")
DOMAIN_NODES = ("Acosh", "Atanh", "Logit", "Digamma", "Lgamma", "Asin", "Acos", "Polygamma",
                "Erfinv")
DIVISION_NODES = ("Div", "Reciprocal", "Norm", "LinalgVectorNorm", "Cdist", "Dist", "Normalize")


def hint_for(cause: str, detail: str = "") -> str:
    """The hint sentence for a cause id, e.g. ``hint_for("division", "...")``.

    >>> hint_for("division").startswith("division by ~0")
    True
    """
    return f"{HINTS[cause]}: {detail}" if detail else HINTS[cause]


@dataclass(frozen=True, kw_only=True)
class RowFacts:
    """What the tensors of a softmax-like op say: did the attention scores overflow, was some
    row entirely masked? ``None``: not known for this op. ``exponent``: pow's scalar exponent."""

    scores_overflow: bool | None = None
    masked_row: bool | None = None
    exponent: float | None = None


def row_facts(op: str, args: tuple, kwargs: dict[str, Any]) -> RowFacts:
    """Look at the tensors themselves where summaries cannot decide (replay only: host syncs).

    >>> row_facts("softmax", (torch.tensor([[0.0, -math.inf], [-math.inf, -math.inf]]), -1), {})
    RowFacts(scores_overflow=None, masked_row=True, exponent=None)
    """
    with torch.no_grad():
        if op in ("softmax", "log_softmax", "logsumexp", "softmin"):
            x, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim")
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return RowFacts()
            masked = torch.isposinf(x) if op == "softmin" else torch.isneginf(x)
            dim = -1 if dim is None else dim
            return RowFacts(masked_row=bool(masked.all(dim).any()) if x.dim() else False)
        if op == "scaled_dot_product_attention":
            return _attention_facts(args, kwargs)
        if op in POW_OPS:
            exponent = _arg(args, kwargs, 1, "exponent")
            if isinstance(exponent, (int, float)) and not isinstance(exponent, bool):
                return RowFacts(exponent=float(exponent))
    return RowFacts()


def _arg(args: tuple, kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _attention_facts(args: tuple, kwargs: dict[str, Any]) -> RowFacts:
    """q @ k^T * scale as the math kernel computes it, and the mask it applies."""
    q, k = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
    mask, causal = _arg(args, kwargs, 3, "attn_mask"), _arg(args, kwargs, 5, "is_causal")
    scale = _arg(args, kwargs, 6, "scale")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() < 2:
        return RowFacts()
    if q.dim() >= 3 and k.dim() >= 3 and k.size(-3) != q.size(-3) and k.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)  # grouped k/v heads
    root = math.sqrt(scale if scale is not None else 1 / math.sqrt(q.size(-1)))
    scores = (q * root) @ (k * root).transpose(-2, -1)  # (..., Tq, Tk)
    overflow = not bool(torch.isfinite(scores).all())
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device)
    if causal:
        allowed = allowed.tril()
    if isinstance(mask, torch.Tensor):
        allowed = allowed & (mask if mask.dtype == torch.bool else ~torch.isneginf(mask))
    return RowFacts(scores_overflow=overflow, masked_row=bool((~allowed).all(-1).any()))


def _dtype_limit(dtype: str) -> str:
    """``"float32 holds at most 3.403e+38"`` for a dtype name as summaries write it."""
    try:
        biggest = torch.finfo(getattr(torch, dtype)).max
    except (AttributeError, TypeError):
        return f"{dtype} has a largest finite value"
    return f"{dtype} holds at most {biggest:.6g}"


def _overflow(op: str, dtype: str, biggest: float, nan: bool) -> tuple[str, str]:
    cause = "fp16_overflow" if dtype == "float16" else "overflow"
    how = (f"finite inputs (up to {biggest:.4g}) overflowed to inf inside {op}, and inf - inf "
           "made NaN" if nan else f"finite inputs (up to {biggest:.4g}) made values too large "
           f"for {dtype} in {op}")
    fix = ("run this op in float32 or bfloat16 (torch.autocast(..., dtype=torch.bfloat16)) or "
           "scale down" if dtype == "float16" else "lower the learning rate, clip gradients "
           "(torch.nn.utils.clip_grad_norm_) or check the initialisation and scaling")
    return cause, f"{how}; {_dtype_limit(dtype)}. {fix[0].upper()}{fix[1:]}"


def _biggest(summaries: list[TensorSummary]) -> float:
    return max((max(abs(s.min or 0), abs(s.max or 0)) for s in summaries), default=0.0)


def _has_negative(s: TensorSummary) -> bool:
    return bool(s.neginf) or (s.min is not None and s.min < 0)


def forward_cause(op: str, inputs: list[TensorSummary], outputs: list[TensorSummary],
                  masked_input: bool, facts: RowFacts | None = None) -> tuple[str, str]:
    """Cause id and hint detail for a forward op whose finite (or intentionally ``-inf``)
    inputs made non-finite outputs; every cause named is one the values show.

    >>> x = TensorSummary(name="x", shape="(2,)", dtype="float16", nan=0, posinf=0, neginf=0,
    ...                   zeros=0, min=-300.0, max=300.0)
    >>> y = TensorSummary(name="y", shape="(2,)", dtype="float16", nan=0, posinf=2, neginf=0,
    ...                   zeros=0, min=None, max=None)
    >>> forward_cause("pow", [x], [y], False, RowFacts(exponent=2.0))[0]
    'fp16_overflow'
    """
    facts = facts or RowFacts()
    nan = any(s.nan for s in outputs)
    dtype = outputs[0].dtype if outputs else (inputs[0].dtype if inputs else "float32")
    first = inputs[0] if inputs else None
    intended = any(not s.finite for s in inputs)  # only intended -inf (a mask) reach here
    if facts.scores_overflow:
        return _overflow(f"{op} (its scores q @ k^T * scale)", dtype, _biggest(inputs), nan)
    if nan and (facts.masked_row or (facts.masked_row is None and masked_input
                                     and op in SOFTMAX_OPS)):
        return "masked_softmax", ("every position of some row was masked to -inf, so softmax "
                                  "computes 0/0; make sure each query sees at least one key, or "
                                  "mask with torch.finfo(dtype).min instead of -inf")
    if first is not None and op in LOG_SQRT_OPS | POW_OPS:
        cause = _log_sqrt_pow(op, first, nan, facts.exponent)
        if cause is not None:
            return cause
    if first is not None and op in DOMAIN_OPS:
        return "domain", (f"{op} got values from {_number(first.min)} to {_number(first.max)}, "
                          f"some outside where {op} is finite; clamp its input to the domain")
    if op in DIVISION_OPS:
        # a / b: the divisor is the second tensor; 1 / x and x.reciprocal(): the only one
        divisor = inputs[1] if len(inputs) > 1 and not op.startswith("reciprocal") else first
        if divisor is not None and divisor.zeros:
            return "division", (f"the divisor has {divisor.zeros} zero(s) (finite range "
                                f"{_number(divisor.min)} .. {_number(divisor.max)}); add an "
                                f"epsilon, e.g. a / (b + 1e-8) or b.clamp_min(1e-8)")
    if nan and intended:
        return "inf_arith", (f"{op} combined the intended -inf of its input (a mask) with "
                             "another inf or a 0 (-inf - -inf and 0 × -inf are NaN); apply the "
                             "mask after this op, or fill with torch.finfo(dtype).min")
    return _overflow(op, dtype, _biggest(inputs), nan)


def _log_sqrt_pow(op: str, x: TensorSummary, nan: bool, exponent: float | None
                  ) -> tuple[str, str] | None:
    """log/sqrt only when the input was out of their domain: NaN needs a negative input, an
    Inf a zero (log(0) = -inf, rsqrt(0) = inf, 0 ** -1 = inf)."""
    zeros = x.zeros or 0
    if op in POW_OPS:
        fractional = exponent is None or not float(exponent).is_integer()
        if nan and _has_negative(x) and fractional:
            return "log_sqrt", (f"{op} raised a negative base (min {_number(x.min)}) to a "
                                f"fractional power ({_exponent(exponent)}), which is NaN; "
                                "clamp the base first, e.g. x.clamp_min(0)")
        if not nan and zeros and (exponent is None or exponent < 0):
            return "division", (f"{op} raised {zeros} zero(s) to a negative power "
                                f"({_exponent(exponent)}): 0 ** -n = 1/0; add an epsilon")
        return None
    if (nan and _has_negative(x)) or (not nan and zeros):
        return "log_sqrt", (f"{op} got values as low as {_number(x.min)} ({zeros} zeros); "
                            "clamp first, e.g. x.clamp_min(1e-8), or use a stable form "
                            "(log_softmax, logsumexp)")
    return None


def _exponent(exponent: float | None) -> str:
    return "a tensor exponent" if exponent is None else f"exponent {exponent:g}"


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def backward_cause(node: str, forward_op: str, zero_incoming: bool,
                   outgoing: list[TensorSummary],
                   forward_inputs: list[TensorSummary] | None = None) -> tuple[str, str]:
    """Cause id and hint detail for an autograd node with finite incoming, non-finite outgoing
    gradients. ``zero_incoming``: the incoming gradient is 0 wherever the outgoing is not finite;
    ``forward_inputs``: the node's forward inputs, which must show the cause a hint names.

    >>> g = TensorSummary(name="g", shape="(2,)", dtype="float16", nan=0, posinf=1, neginf=0,
    ...                   zeros=0, min=1.0, max=1.0)
    >>> x = TensorSummary(name="x", shape="(2,)", dtype="float16", nan=0, posinf=0, neginf=0,
    ...                   zeros=0, min=100.0, max=300.0)
    >>> backward_cause("PowBackward0", "pow", False, [g], [x])[0]
    'fp16_overflow'
    """
    where = forward_op or node
    first = forward_inputs[0] if forward_inputs else None
    zeros = sum(s.zeros or 0 for s in forward_inputs or [])
    dtype = outgoing[0].dtype if outgoing else "float32"
    if zero_incoming:
        return "where_trap", (f"this branch ({forward_op}) was not selected, so its gradient is "
                              "0, but 0 × its infinite derivative is NaN; make the unused branch "
                              "safe, e.g. torch.where(x > 0, torch.sqrt(x.clamp_min(1e-12)), 0)")
    if node.startswith(LOG_SQRT_NODES) and (first is None or first.zeros or _has_negative(first)):
        return "log_sqrt", (f"the derivative of {where} is infinite at 0 (d/dx "
                            "sqrt(x) = 1/(2 sqrt(x)), d/dx log(x) = 1/x) and its input had "
                            f"{first.zeros if first else 'some'} zero(s); clamp the input, "
                            "e.g. x.clamp_min(1e-8), or add an epsilon inside")
    if node.startswith(DOMAIN_NODES):
        return "domain", (f"the derivative of {where} is infinite at the edge of its domain "
                          "(asin/acos at ±1, atanh at ±1); clamp the input inside the domain")
    if node.startswith(DIVISION_NODES) and (forward_inputs is None or zeros):
        return "division", (f"the gradient of {where} divides by a value near 0 "
                            "(a zero divisor, or the norm of a zero vector); add an epsilon")
    nan = any(s.nan for s in outgoing)
    cause, detail = _overflow(f"the gradient of {where}", dtype,
                              _biggest(forward_inputs or []), nan)
    if dtype == "float16":
        detail += "; for training in float16 use torch.amp.GradScaler"
    return cause, detail

"""What the NaN/Inf watch tells the user: the report, its hints, and how it prints.

A report names the *producer* of the first non-finite value (the op whose inputs were finite
and whose output was not), where it ran (phase, module path, the user's source line) and the
numbers around it (finite range and NaN/Inf counts of inputs, outputs and parameters). The hint
picks the most likely cause from what those numbers say.
"""

from __future__ import annotations

import linecache
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.console import render_html, render_text
from torchlens_edu.dims import format_shape

ALL_KINDS = frozenset({"nan", "+inf", "-inf"})

# cause id -> the hint's opening words (the categories a learner meets most)
HINTS: dict[str, str] = {
    "log_sqrt": "log/sqrt of <= 0",
    "division": "division by ~0",
    "masked_softmax": "softmax over a fully masked row",
    "fp16_overflow": "fp16 overflow above 65504",
    "exploding": "exploding values/learning rate",
    "where_trap": "where-gradient trap",
    "input": "non-finite input",
    "loss": "non-finite gradient from the loss",
    "other_rank": "another rank",
    "not_reproduced": "not reproduced",
}

LOG_SQRT_OPS = frozenset({"log", "log2", "log10", "log1p", "sqrt", "rsqrt", "pow", "float_power",
                          "lgamma", "digamma", "acosh", "atanh", "logit", "log_", "sqrt_",
                          "rsqrt_", "log2_", "log10_", "log1p_", "pow_"})
DIVISION_OPS = frozenset({"div", "div_", "true_divide", "divide", "reciprocal", "reciprocal_",
                          "floor_divide", "remainder", "fmod", "truediv", "truediv_"})
SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "softmin", "scaled_dot_product_attention",
                         "multi_head_attention_forward", "logsumexp"})
LOG_SQRT_NODES = ("Sqrt", "Rsqrt", "Log", "Pow", "Acosh", "Atanh", "Logit", "Digamma", "Lgamma",
                  "Asin", "Acos")
DIVISION_NODES = ("Div", "Reciprocal", "Norm", "LinalgVectorNorm", "Cdist", "Dist", "Normalize")


@dataclass
class TensorSummary:
    """One tensor around the producer: its role, named shape, dtype, counts and finite range."""

    name: str
    shape: str
    dtype: str
    nan: int | None
    posinf: int | None
    neginf: int | None
    zeros: int | None
    min: float | None
    max: float | None
    note: str = ""

    @classmethod
    def of(cls, name: str, t: torch.Tensor, dims: Mapping[str, int] | None = None
           ) -> TensorSummary:
        """Summarise ``t`` with :func:`torchlens_edu.printing.tensor_stats` (one host read).

        >>> TensorSummary.of("x", torch.tensor([1.0, float("nan")])).nan
        1
        """
        from torchlens_edu.printing import tensor_stats

        s = tensor_stats(t)
        return cls(name, format_shape(tuple(t.shape), dims), str(t.dtype).replace("torch.", ""),
                   s.nan, s.posinf, s.neginf, s.zeros, s.min, s.max, s.note)

    @property
    def finite(self) -> bool:
        return not (self.nan or self.posinf or self.neginf)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(repr=False)
class NonFiniteReport:
    """Where the first NaN/Inf was made, and the likely cause.

    ``phase`` is ``"input"`` (it came in with the inputs), ``"forward"`` or ``"backward"``;
    ``module`` the module path (``""`` for the root); ``op`` the torch function / method (``log``)
    or autograd node (``SqrtBackward0``); ``kind`` ``"nan"``, ``"+inf"`` or ``"-inf"``; ``source``
    the user's ``"file.py:LINE"`` (in the backward: the forward line that created the node).

    >>> r = NonFiniteReport("forward", "h.0", "log", "nan", "model.py:12", None, "log/sqrt of <= 0")
    >>> r.to_dict()["op"]
    'log'
    """

    phase: str
    module: str
    op: str
    kind: str
    source: str
    rank: int | None
    hint: str
    cause: str = ""
    step: int = 0
    forward_op: str = ""  # backward only: the forward call that created the node
    inputs: list[TensorSummary] = field(default_factory=list)
    outputs: list[TensorSummary] = field(default_factory=list)
    params: list[TensorSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for programs: phase, module, op, kind, source, rank, hint and details."""
        data = {k: v for k, v in vars(self).items() if k not in ("inputs", "outputs", "params")}
        for group in ("inputs", "outputs", "params"):
            data[group] = [s.to_dict() for s in getattr(self, group)]
        return data

    def summary(self) -> str:
        """One line: what was made where, e.g. ``NaN in forward: log at model.py:12 (h.0.attn)``."""
        what = {"nan": "NaN", "+inf": "+Inf", "-inf": "-Inf"}.get(self.kind, self.kind)
        where = f" at {_short(self.source)}" if self.source else ""
        module = f" (module {self.module!r})" if self.module else " (root module)"
        op = f": {self.op}" if self.op else ""
        rank = f"[rank {self.rank}] " if self.rank is not None else ""
        return f"{rank}{what} made in {self.phase}{op}{where}{module}"

    def __rich__(self) -> Panel:
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column(overflow="fold")  # a long path must wrap, never lose its ":LINE"
        rows = [("phase", self.phase), ("module", repr(self.module) + (" (root)" if not
                                                                       self.module else "")),
                ("op", self.op + (f"  (created by {self.forward_op})" if self.forward_op else "")),
                ("kind", self.kind), ("source", _short(self.source)),
                ("code", _code_line(self.source)),
                ("rank", "" if self.rank is None else str(self.rank)),
                ("step", str(self.step))]
        for key, value in rows:
            if value:
                head.add_row(key, Text(value))
        parts: list[Any] = [head]
        tensors = [(g, s) for g in ("inputs", "outputs", "params") for s in getattr(self, g)]
        if tensors:
            parts.append(_tensor_table(tensors))
        parts.append(Text.assemble(("hint: ", "bold yellow"), self.hint))
        return Panel(Group(*parts), title=Text(self.summary(), style="bold red"),
                     title_align="left", border_style="red")

    def __str__(self) -> str:
        return render_text(self)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return render_html(self)


def _short(source: str) -> str:
    """``file.py:LINE`` relative to the working directory when it lies below it: the line the
    user reads first, and short enough for a terminal. ``to_dict`` keeps the full path."""
    path, sep, line = source.rpartition(":")
    if not sep or not os.path.isabs(path):
        return source
    relative = os.path.relpath(path)
    return source if relative.startswith("..") else f"{relative}:{line}"


def _code_line(source: str) -> str:
    path, _, line = source.rpartition(":")
    if not path or not line.isdigit():
        return ""
    return linecache.getline(path, int(line)).strip()


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _count(value: int | None) -> Text:
    if value is None:
        return Text("?")
    return Text(str(value), style="bold red" if value else "")


def _tensor_table(rows: list[tuple[str, TensorSummary]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  caption="min/max over the finite values", caption_justify="left")
    table.add_column("tensor", overflow="fold", min_width=14, ratio=3)
    table.add_column("shape", overflow="fold", ratio=2)
    table.add_column("dtype")
    for title in ("NaN", "+Inf", "-Inf", "min", "max"):
        table.add_column(title, justify="right")
    for group, s in rows:
        name = f"param {s.name}" if group == "params" else s.name
        table.add_row(name, s.shape, s.dtype, _count(s.nan), _count(s.posinf), _count(s.neginf),
                      _number(s.min), _number(s.max))
    return table


def kind_of(summaries: list[TensorSummary]) -> str:
    """The kind to report for non-finite outputs: NaN first, then +Inf, then -Inf."""
    for attr, kind in (("nan", "nan"), ("posinf", "+inf"), ("neginf", "-inf")):
        if any(getattr(s, attr) for s in summaries):
            return kind
    return "nan"


def hint_for(cause: str, detail: str = "") -> str:
    """The hint sentence for a cause id, e.g. ``hint_for("division", "...")``.

    >>> hint_for("division").startswith("division by ~0")
    True
    """
    return f"{HINTS[cause]}: {detail}" if detail else HINTS[cause]


def forward_cause(op: str, inputs: list[TensorSummary], outputs: list[TensorSummary],
                  masked_input: bool) -> tuple[str, str]:
    """Cause id and hint detail for a forward op whose finite inputs made non-finite outputs."""
    first = inputs[0] if inputs else None
    if op in LOG_SQRT_OPS and first is not None and first.min is not None and (
            first.min <= 0 or first.neginf):
        return "log_sqrt", (f"{op} got values as low as {first.min:.4g} "
                            f"({first.zeros or 0} zeros); clamp first, e.g. "
                            f"x.clamp_min(1e-8), or use a stable form (log_softmax, logsumexp)")
    if op in DIVISION_OPS:
        # a / b: the divisor is the second tensor; 1 / x and x.reciprocal(): the only one
        divisor = inputs[1] if len(inputs) > 1 and not op.startswith("reciprocal") else first
        if divisor is not None:
            return "division", (f"the divisor has {divisor.zeros or 0} zero(s) (finite range "
                                f"{_number(divisor.min)} .. {_number(divisor.max)}); add an "
                                f"epsilon, e.g. a / (b + 1e-8) or b.clamp_min(1e-8)")
    if (op in SOFTMAX_OPS or masked_input) and any(s.nan for s in outputs):
        return "masked_softmax", ("every position of some row was masked to -inf, so softmax "
                                  "computes 0/0; make sure each query sees at least one key, or "
                                  "mask with torch.finfo(dtype).min instead of -inf")
    if any(s.dtype == "float16" and (s.posinf or s.neginf) for s in outputs):
        biggest = max((max(abs(s.min or 0), abs(s.max or 0)) for s in inputs), default=0.0)
        return "fp16_overflow", (f"the result no longer fits float16 (inputs up to "
                                 f"{biggest:.4g}); run this op in float32 or bfloat16 "
                                 "(torch.autocast(..., dtype=torch.bfloat16)) or scale down")
    biggest = max((max(abs(s.min or 0), abs(s.max or 0)) for s in inputs), default=0.0)
    return "exploding", (f"finite inputs up to {biggest:.4g} overflowed in {op}; lower the "
                         "learning rate, clip gradients (torch.nn.utils.clip_grad_norm_) or "
                         "check the initialisation")


def backward_cause(node: str, forward_op: str, zero_incoming: bool,
                   outgoing: list[TensorSummary]) -> tuple[str, str]:
    """Cause id and hint detail for an autograd node with finite incoming, non-finite outgoing
    gradients. ``zero_incoming``: the incoming gradient is 0 wherever the outgoing is not finite.
    """
    if zero_incoming:
        return "where_trap", (f"this branch ({forward_op}) was not selected, so its gradient is "
                              "0, but 0 × its infinite derivative is NaN; make the unused branch "
                              "safe, e.g. torch.where(x > 0, torch.sqrt(x.clamp_min(1e-12)), 0)")
    if node.startswith(LOG_SQRT_NODES):
        return "log_sqrt", (f"the derivative of {forward_op or node} is infinite at 0 (d/dx "
                            "sqrt(x) = 1/(2 sqrt(x)), d/dx log(x) = 1/x); clamp the input, "
                            "e.g. x.clamp_min(1e-8), or add an epsilon inside")
    if node.startswith(DIVISION_NODES):
        return "division", (f"the gradient of {forward_op or node} divides by a value near 0 "
                            "(a zero divisor, or the norm of a zero vector); add an epsilon")
    if any(s.dtype == "float16" and (s.posinf or s.neginf) for s in outgoing):
        return "fp16_overflow", ("a float16 gradient exceeded 65504; use torch.amp.GradScaler "
                                 "or bfloat16")
    return "exploding", ("finite gradients overflowed here; lower the learning rate, clip "
                         "gradients (torch.nn.utils.clip_grad_norm_) or scale the loss down")


def bad_kinds(t: torch.Tensor, kinds: frozenset[str] = ALL_KINDS) -> frozenset[str]:
    """Which of ``kinds`` (``"nan"``, ``"+inf"``, ``"-inf"``) occur in ``t`` (host syncs).

    >>> sorted(bad_kinds(torch.tensor([1.0, float("-inf"), float("nan")])))
    ['-inf', 'nan']
    """
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.numel() == 0 or bool(torch.isfinite(t).all()):
        return frozenset()
    found = set()
    if "nan" in kinds and bool(torch.isnan(t).any()):
        found.add("nan")
    if "+inf" in kinds and bool((t == math.inf).any()):
        found.add("+inf")
    if "-inf" in kinds and bool((t == -math.inf).any()):
        found.add("-inf")
    return frozenset(found)


@dataclass
class Producer:
    """The op (or autograd node) that made the first non-finite value, and what surrounded it."""

    phase: str
    index: int  # position of the forward call in the replay (for stopping there again)
    op: str
    module: str
    source: str
    cause: str
    hint: str
    inputs: list[TensorSummary] = field(default_factory=list)
    outputs: list[TensorSummary] = field(default_factory=list)
    params: list[TensorSummary] = field(default_factory=list)
    forward_op: str = ""

    @property
    def kind(self) -> str:
        return kind_of(self.outputs)


class Found(Exception):
    """Raised inside a replay at the producer, to stop it there."""

    def __init__(self, producer: Producer) -> None:
        super().__init__(producer.op)
        self.producer = producer

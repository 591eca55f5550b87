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
from typing import Any, Literal

import torch
from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.console import render_html, render_text
from torchlens_edu._core.formatting import dtype_name
from torchlens_edu.dims import format_shape

Phase = Literal["input", "forward", "backward"]  # where a non-finite value showed up
# "inf": an Inf of either sign, as the cheap tier sees it (largest magnitude) when no replay
# made it again to tell the sign
Kind = Literal["nan", "+inf", "-inf", "inf"]
ALL_KINDS: frozenset[Kind] = frozenset({"nan", "+inf", "-inf"})

@dataclass(frozen=True, kw_only=True)
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
        return cls(name=name, shape=format_shape(tuple(t.shape), dims), dtype=dtype_name(t.dtype),
                   nan=s.nan, posinf=s.posinf, neginf=s.neginf, zeros=s.zeros, min=s.min,
                   max=s.max, note=s.note)

    @property
    def finite(self) -> bool:
        return not (self.nan or self.posinf or self.neginf)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(repr=False, kw_only=True)
class NonFiniteReport:
    """Where the first NaN/Inf was made, and the likely cause.

    ``phase`` is ``"input"`` (it came in with the inputs), ``"forward"`` or ``"backward"``;
    ``module`` the module path (``""`` for the root); ``op`` the torch function / method (``log``)
    or autograd node (``SqrtBackward0``); ``kind`` ``"nan"``, ``"+inf"`` or ``"-inf"``; ``source``
    the user's ``"file.py:LINE"`` (in the backward: the forward line that created the node).

    >>> r = NonFiniteReport(phase="forward", module="h.0", op="log", kind="nan",
    ...                     source="model.py:12", hint="log/sqrt of <= 0")
    >>> r.to_dict()["op"]
    'log'
    """

    phase: Phase
    module: str
    op: str
    kind: Kind
    source: str
    rank: int | None = None  # under torch.distributed: the rank that reports
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
        what = {"nan": "NaN", "+inf": "+Inf", "-inf": "-Inf", "inf": "Inf"}.get(self.kind,
                                                                                self.kind)
        where = f" at {_short(self.source)}" if self.source else ""
        module = f" (module {self.module!r})" if self.module else " (root module)"
        op = f": {self.op}" if self.op else ""
        rank = f"[rank {self.rank}] " if self.rank is not None else ""
        if self.cause == "not_reproduced":  # seen, but no producer to name: say just that
            return f"{rank}{what} seen in {self.phase}{module}{where}, producer not found"
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


def kind_of(summaries: list[TensorSummary]) -> Kind:
    """The kind to report for non-finite outputs: NaN first, then +Inf, then -Inf."""
    if any(s.nan for s in summaries):
        return "nan"
    if any(s.posinf for s in summaries):
        return "+inf"
    if any(s.neginf for s in summaries):
        return "-inf"
    return "nan"


def bad_kinds(t: torch.Tensor, kinds: frozenset[Kind] = ALL_KINDS) -> frozenset[Kind]:
    """Which of ``kinds`` (``"nan"``, ``"+inf"``, ``"-inf"``) occur in ``t`` (host syncs).

    >>> sorted(bad_kinds(torch.tensor([1.0, float("-inf"), float("nan")])))
    ['-inf', 'nan']
    """
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.numel() == 0 or bool(torch.isfinite(t).all()):
        return frozenset()
    found: set[Kind] = set()
    if "nan" in kinds and bool(torch.isnan(t).any()):
        found.add("nan")
    if "+inf" in kinds and bool((t == math.inf).any()):
        found.add("+inf")
    if "-inf" in kinds and bool((t == -math.inf).any()):
        found.add("-inf")
    return frozenset(found)


@dataclass(frozen=True, kw_only=True)
class Producer:
    """The op (or autograd node) that made the first non-finite value, and what surrounded it."""

    phase: Literal["forward", "backward"]
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
    def kind(self) -> Kind:
        return kind_of(self.outputs)


class Found(Exception):
    """Raised inside a replay at the producer, to stop it there."""

    def __init__(self, producer: Producer) -> None:
        super().__init__(producer.op)
        self.producer = producer

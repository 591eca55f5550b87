"""What the NaN/Inf watch tells the user: the report, its hints, and how it prints.

A report names the *producer* of the first non-finite value (the op whose inputs were finite
and whose output was not), where it ran (phase, module path, the user's source line) and the
numbers around it (finite range and NaN/Inf counts of inputs, outputs and parameters). The hint
picks the most likely cause from what those numbers say.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.console import render_html, render_text
from torchlens_edu._core.formatting import dtype_name
from torchlens_edu._core.modules import also_reachable
from torchlens_edu._core.sites import source_text
from torchlens_edu.dims import AxisRoles, format_shape
from torchlens_edu.nans.shards import has_values
from torchlens_edu.printing.stats import local_shard, padded_shape

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
    def of(cls, name: str, t: torch.Tensor, dims: Mapping[str, int] | None = None,
           axes: AxisRoles | None = None) -> TensorSummary:
        """Summarise ``t`` with :func:`torchlens_edu.printing.tensor_stats` (one host read);
        ``axes``: the roles of a weight's axes (``wpe.weight`` is ``(ctx, C)``).

        >>> TensorSummary.of("x", torch.tensor([1.0, float("nan")])).nan
        1
        """
        from torchlens_edu.printing import tensor_stats

        t = local_shard(t)  # a DTensor: this rank's shard (the report says which rank)
        s = tensor_stats(t)
        shape = format_shape(padded_shape(t), dims, axes=axes, dtype=t.dtype)
        return cls(name=name, shape=shape,
                   dtype=dtype_name(t.dtype),
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
    aliases: list[str] = field(default_factory=list)  # the module's other paths, if any
    call: int = 0  # the module's how-manieth call in the forward (forward reports; 0: first)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for programs: phase, module, op, kind, source, rank, hint and details
        (and ``aliases``, the module's other paths, when it has any; ``call``, for a module
        that runs several times per forward, when the NaN/Inf came from a later call).

        >>> NonFiniteReport(phase="input", module="", op="", kind="nan", source="",
        ...                 hint="check the data").to_dict()["hint"]
        'check the data'
        """
        data = {k: v for k, v in vars(self).items()
                if k not in ("inputs", "outputs", "params", "aliases", "call")}
        for group in ("inputs", "outputs", "params"):
            data[group] = [s.to_dict() for s in getattr(self, group)]
        if self.aliases:  # only for a module reachable under several paths
            data["aliases"] = list(self.aliases)
        if self.call:  # only for a later call of a module that runs several times
            data["call"] = self.call
        return data

    def summary(self) -> str:
        """One line: what was made where.

        >>> NonFiniteReport(phase="forward", module="h.0", op="log", kind="nan",
        ...                 source="model.py:12", hint="").summary()
        "NaN made in forward: log at model.py:12 (module 'h.0')"
        """
        what = {"nan": "NaN", "+inf": "+Inf", "-inf": "-Inf", "inf": "Inf"}.get(self.kind,
                                                                                self.kind)
        where = f" at {_short(self.source)}" if self.source else ""
        module = f" (module {self.module!r}{self._call_text()})" if self.module else \
            " (root module)"
        op = f": {self.op}" if self.op else ""
        rank = f"[rank {self.rank}] " if self.rank is not None else ""
        if self.cause == "not_reproduced":  # seen, but no producer to name: say just that
            return f"{rank}{what} seen in {self.phase}{module}{where}, producer not found"
        if self.cause == "other_rank":  # this rank stops for another's finding
            at = f"; this rank stopped at {_short(self.source)}" if self.source else ""
            return f"{rank}{what} found by another rank in the {self.phase}{at}"
        return f"{rank}{what} made in {self.phase}{op}{where}{module}"

    def _call_text(self) -> str:
        """``", call #2"``: a module that runs several times per forward (a shared layer)."""
        return f", call #{self.call} of this forward" if self.call else ""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # laid out for the width at hand: a narrow terminal (or a pipe, 80 columns) gets the
        # tensors stacked, never a number cut short or a name wrapped over several lines
        inner = max(options.max_width - 4, 20)  # the panel's border and padding
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold", no_wrap=True)
        head.add_column(overflow="fold")  # a long path must wrap, never lose its ":LINE"
        module = repr(self.module) + (" (root)" if not self.module else self._call_text())
        if self.aliases:  # one module under several paths
            module += f" ({also_reachable([self.module, *self.aliases], self.module)})"
        rows = [("phase", self.phase), ("module", module),
                ("op", self.op + (f"  (created by {self.forward_op})" if self.forward_op else "")),
                ("kind", self.kind), ("source", _short(self.source)),
                ("code", _code_line(self.source)),
                ("rank", "" if self.rank is None else str(self.rank)),
                ("step", str(self.step))]
        for key, value in rows:
            if value:
                head.add_row(key, Text(value))
        parts: list[Any] = [head]
        tensors = [(f"param {s.name}" if g == "params" else s.name, s)
                   for g in ("inputs", "outputs", "params") for s in getattr(self, g)]
        if tensors:
            parts.append(_tensor_table(tensors, inner, console))
        parts.append(Text.assemble(("hint: ", "bold yellow"), self.hint))
        yield Panel(Group(*parts), title=Text(self._title(inner), style="bold red"),
                    title_align="left", border_style="red")

    def _title(self, width: int) -> str:
        """What was made, in which phase, by which op (if it fits; the rows below say where)."""
        what = {"nan": "NaN", "+inf": "+Inf", "-inf": "-Inf", "inf": "Inf"}.get(self.kind,
                                                                                self.kind)
        rank = f"[rank {self.rank}] " if self.rank is not None else ""
        verb = {"not_reproduced": "seen", "other_rank": "found by another rank"}.get(
            self.cause, "made")
        long = f"{rank}{what} {verb} in {self.phase}" + (f": {self.op}" if self.op else "")
        return long if len(long) <= width - 2 else f"{what} {verb} in {self.phase}"

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
    return source_text(path, int(line))


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _count(value: int | None) -> Text:
    if value is None:
        return Text("?")
    return Text(str(value), style="bold red" if value else "")


_STAT_TITLES = ("NaN", "+Inf", "-Inf", "min", "max")
_CAPTION = "min/max over the finite values"


def _stats(s: TensorSummary) -> list[tuple[str, Text]]:
    return [("NaN", _count(s.nan)), ("+Inf", _count(s.posinf)), ("-Inf", _count(s.neginf)),
            ("min", Text(_number(s.min))), ("max", Text(_number(s.max)))]


def shorten_left(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, its path cut from the left, where a path is
    least informative (``param …h.11.mlp.c_fc.weight``), preferably at a dot.

    >>> shorten_left("param transformer.h.11.mlp.c_fc.weight", 28)
    'param …h.11.mlp.c_fc.weight'
    """
    if len(name) <= width:
        return name
    prefix, _, path = name.rpartition(" ")
    prefix = f"{prefix} " if prefix else ""
    room = width - len(prefix) - 1  # the ellipsis
    if room < 4:
        return "…" + name[len(name) - width + 1:]
    tail = path[len(path) - room:]
    dot = tail.find(".")
    if 0 <= dot < len(tail) - 4:
        tail = tail[dot + 1:]
    return f"{prefix}…{tail}"


def _tensor_table(rows: list[tuple[str, TensorSummary]], width: int,
                  console: Console) -> RenderableType:
    """A table when its columns fit ``width`` with every number whole and names of at least
    24 characters (paths shortened from the left); else one stacked block per tensor."""
    fixed = _wide_table([("", s) for _, s in rows])
    natural = Measurement.get(console, console.options.update(width=10_000), fixed).maximum
    room = width - natural + len("tensor")  # what the name column may take
    longest = max(len(name) for name, _ in rows)
    if room >= min(longest, 24):  # enough to keep a path's last two or three parts
        return _wide_table([(shorten_left(name, room), s) for name, s in rows])
    return _stacked(rows, width)


def _wide_table(rows: list[tuple[str, TensorSummary]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, caption=_CAPTION,
                  caption_justify="left")
    table.add_column("tensor", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    for title in _STAT_TITLES:
        table.add_column(title, justify="right", no_wrap=True)
    for name, s in rows:
        table.add_row(name, s.shape, s.dtype, *(value for _, value in _stats(s)))
    return table


def _stacked(rows: list[tuple[str, TensorSummary]], width: int) -> Group:
    """Each tensor as a name line (the path shortened from the left), then its shape and
    dtype, then its counts and range packed into as many lines as ``width`` needs; a line
    breaks only between two ``label value`` pairs, so no number is ever split."""
    lines: list[Text] = []
    for name, s in rows:
        lines.append(Text(shorten_left(name, width), style="bold"))
        pairs = [Text(s.shape), Text(s.dtype)] + [Text.assemble(f"{label} ", value)
                                                   for label, value in _stats(s)]
        line = Text("  ")
        for pair in pairs:
            if line.cell_len > 2 and line.cell_len + 2 + pair.cell_len > width:
                lines.append(line)
                line = Text("  ")
            line.append_text(Text("  ") if line.cell_len > 2 else Text(""))
            line.append_text(pair)
        lines.append(line)
    lines.append(Text(f"({_CAPTION})", style="dim"))
    return Group(*lines)


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
    t = local_shard(t).detach()  # a DTensor: this rank's shard, no collective
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.numel() == 0 or not has_values(t) or bool(torch.isfinite(t).all()):
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
    call: int = 0  # which call of the module in the forward (a layer applied several times)

    @property
    def kind(self) -> Kind:
        return kind_of(self.outputs)


class Found(Exception):
    """Raised inside a replay at the producer, to stop it there."""

    def __init__(self, producer: Producer) -> None:
        super().__init__(producer.op)
        self.producer = producer

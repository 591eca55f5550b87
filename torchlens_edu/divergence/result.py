"""What a comparison found: the first divergence, the per-module drift table, the gradients.

``Comparison.to_dict()`` schema (plain JSON types; shapes are lists, "inf" errors are floats)::

    {"agree": bool,                      # no divergence beyond the tolerance
     "alignment": "path"|"map"|"structure", "aligned_modules": int,
     "rtol": float|None, "atol": float|None,   # None: the dtype's default (tolerance.py)
     "first": None | {"kind": "op"|"weights"|"missing-op"|"extra-op"|"shape"|"module"|"gradient",
               "module": str, "reference_module": str, "op": str|None, "reference_op": str|None,
               "source": str, "reference_source": str,   # "file.py:LINE" ("" when unknown)
               "shape": list[int], "reference_shape": list[int],
               "max_abs": float, "max_rel": float, "worst_index": list[int]|None,
               "worst_at": str|None,           # the worst index with axis names: "B=0, nh=2, T=5"
               "inputs_differed": bool,        # the op's operands already differed
               "detail": str,
               "operands": [{"role": "in 0"|"in 1"|...|"out"|"out 0"|..., "name": str,
                             # the user's variable ("q"), a parameter's name, or "transpose(...)"
                             "shape": list[int], "dtype": str,
                             "reference_name": str, "reference_shape": list[int]|None,
                             "max_abs": float|None,   # None: no counterpart in the reference
                             "status": "same"|"drift"|"differs"|"shape"|""}, ...]},
     "modules": [{"module", "reference_module", "max_abs", "max_rel",
                  "status": "same"|"drift"|"differs"|"shape"}, ...],   # in the order they ran
     "gradients": [{"parameter", "max_abs", "max_rel", "status"}, ...], # backward=True only
     "loss": str|None,   # backward=True: which loss the gradients are of (see loss.py)
     "dims": {str: int},  # the axis names shapes are shown with
     "notes": [str, ...]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.console import render_html, render_text
from torchlens_edu.dims import Dims, format_shape

_STYLE = {"same": "green", "drift": "yellow", "differs": "bold red", "shape": "bold red"}
_TABLE_ROWS = 12  # longer drift tables show the rows that are not "same" (and the last one)


@dataclass(frozen=True, kw_only=True)
class Drift:
    """One aligned module's output against the reference's (or one parameter's gradient)."""

    module: str
    reference_module: str
    max_abs: float
    max_rel: float
    status: str  # "same", "drift", "differs" or "shape"


@dataclass(frozen=True, kw_only=True)
class Operand:
    """One operand (or result) of the blamed op, beside the reference op's."""

    role: str  # "in 0", "in 1", ..., "out" ("out 0", ... when the op returns several)
    name: str  # the user's variable (``q``), a parameter's name, or what made it
    shape: tuple[int, ...]
    dtype: str
    reference_name: str
    reference_shape: tuple[int, ...] | None  # None: the reference op has no such operand
    max_abs: float | None
    status: str  # "same", "drift", "differs", "shape", or "" without a counterpart


@dataclass(frozen=True, kw_only=True)
class Divergence:
    """The first place where the model stops agreeing with the reference."""

    kind: str  # see the schema in this module's docstring
    module: str  # "" is the model itself
    reference_module: str
    op: str | None
    reference_op: str | None
    source: str  # "file.py:LINE" in the model under test
    reference_source: str
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...] | None
    inputs_differed: bool
    detail: str
    operands: list[Operand] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The answer of :func:`~torchlens_edu.divergence.compare`: ``first`` is None when the
    models agree within the tolerance.

    >>> import torch.nn as nn
    >>> from torchlens_edu.divergence import compare
    >>> torch.manual_seed(0); a = nn.Linear(2, 2); b = nn.Linear(2, 2)  # doctest: +ELLIPSIS
    <...>
    >>> result = compare(a, b, torch.ones(1, 2))
    >>> result.first.kind, result.agree
    ('weights', False)
    """

    first: Divergence | None
    alignment: str
    aligned_modules: int
    modules: list[Drift]
    gradients: list[Drift] = field(default_factory=list)
    rtol: float | None = None
    atol: float | None = None
    notes: list[str] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)
    loss: str | None = None  # backward=True: which loss the gradients are of

    @property
    def agree(self) -> bool:
        """No divergence beyond the tolerance (drift is allowed).

        >>> from torchlens_edu.divergence import compare
        >>> compare(torch.nn.Tanh(), torch.nn.Tanh(), torch.ones(2)).agree
        True
        """
        return self.first is None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, in the schema of this module's docstring.

        >>> from torchlens_edu.divergence import compare
        >>> data = compare(torch.nn.Softmax(0), torch.nn.Softmax(1), torch.rand(2, 3)).to_dict()
        >>> data["first"]["op"]
        'softmax'
        """
        first = None
        if self.first is not None:
            first = dataclasses.asdict(self.first)
            for key in ("shape", "reference_shape", "worst_index"):
                first[key] = None if first[key] is None else list(first[key])
            first["worst_at"] = self._worst_at()
            for operand in first["operands"]:
                for key in ("shape", "reference_shape"):
                    operand[key] = None if operand[key] is None else list(operand[key])
        return {"agree": self.agree, "alignment": self.alignment,
                "aligned_modules": self.aligned_modules, "rtol": self.rtol, "atol": self.atol,
                "first": first, "modules": [dataclasses.asdict(row) for row in self.modules],
                "gradients": [{"parameter": row.module, "max_abs": row.max_abs,
                               "max_rel": row.max_rel, "status": row.status}
                              for row in self.gradients],
                "loss": self.loss, "dims": dict(self.dims), "notes": list(self.notes)}

    def _worst_at(self) -> str | None:
        first = self.first
        if first is None or first.worst_index is None or len(first.worst_index) != len(
                first.shape):
            return None
        return Dims(self.dims).coordinates(first.shape, first.worst_index)

    def __rich_console__(self, console: Console, options: ConsoleOptions
                         ) -> Iterator[RenderableType]:
        how = {"path": "by module path", "map": "by your map",
               "structure": "by structure (the order of module calls and their shapes)"}
        yield Text(f"aligned {self.aligned_modules} modules {how.get(self.alignment, '')}",
                   style="dim")
        yield self._headline()
        drifting = [row for row in self.modules if row.status == "drift"]
        if drifting and self.first is None:
            worst = max(drifting, key=lambda row: row.max_abs)
            yield Text(f"drift (legal, within the tolerance): largest at "
                       f"{worst.module or '(model)'}, max abs {worst.max_abs:.2e}", style="yellow")
        if self.modules and all(row.status == "same" for row in self.modules):
            yield Text(f"all {len(self.modules)} aligned module outputs hold the same numbers "
                       f"(torch.testing's tolerance)", style="green")
        elif self.modules:
            rows = self.modules
            differing = [i for i, row in enumerate(rows) if row.status in ("differs", "shape")]
            if differing and len(rows) - differing[0] > 2:  # after it, everything differs
                rows = rows[:differing[0] + 1]
                yield _table("module", "reference", rows)
                yield Text(f"... and {len(self.modules) - len(rows)} later modules, which run "
                           f"on what it passed on", style="dim")
            else:
                yield _table("module", "reference", rows)
        if self.gradients and all(row.status == "same" for row in self.gradients):
            yield Text(f"all {len(self.gradients)} parameter gradients hold the same numbers",
                       style="green")
        elif self.gradients:
            yield _table("parameter (gradient)", "", self.gradients)
        if self.loss:
            yield Text(f"gradients of: {self.loss}", style="dim")
        for note in self.notes:
            yield Text(f"note: {note}", style="dim")

    def _headline(self) -> RenderableType:
        first = self.first
        if first is None:
            return Text("the models agree within the tolerance", style="bold green")
        where = first.module or "(the model itself)"
        facts = Table.grid()  # a label column, and values that wrap under themselves
        facts.add_column(no_wrap=True, min_width=13)
        facts.add_column()
        if first.kind == "missing-op":
            facts.add_row("  your line", first.source or "?")
        elif first.op:
            facts.add_row("  op", f"{first.op}   at {first.source or '?'}")
        if first.reference_op or first.reference_source:
            facts.add_row("  reference", f"{first.reference_op or '(no counterpart)'}   at "
                                         f"{first.reference_source or '?'}")
        shape = format_shape(first.shape, self.dims)
        if first.shape != first.reference_shape:
            facts.add_row("  shape", f"{shape} where the reference has "
                                     f"{format_shape(first.reference_shape, self.dims)}")
        else:
            facts.add_row("  gradient" if first.kind == "gradient" else "  output",
                          f"{shape}: max abs {first.max_abs:.3e}, max rel {first.max_rel:.3e}")
            if first.worst_index is not None:
                named = self._worst_at()
                facts.add_row("  worst at", f"{named}   (index {first.worst_index})" if named
                              else f"index {first.worst_index}")
        if first.kind == "gradient":  # the forward agreed; the gradient reaching it too
            facts.add_row("  forward", "agreed")
        else:
            facts.add_row("  inputs", "already differed" if first.inputs_differed else "agreed")
        facts.add_row("  why", first.detail)
        lines: list[RenderableType] = [
            Text.assemble(("first difference: ", "bold red"), (where, "bold"), f" ({first.kind})"),
            facts]
        if first.operands:
            lines.append(self._operands(first.operands))
        return Group(*lines)

    def _operands(self, operands: list[Operand]) -> Table:
        """The blamed op's operands and results, named and with named dims, beside the
        reference op's (its shape only where it differs)."""
        table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
        table.add_column("  ", no_wrap=True)
        table.add_column("yours", overflow="fold")
        table.add_column("reference", overflow="fold")
        table.add_column("vs reference", overflow="fold")
        for row in operands:
            yours = f"{row.name} {format_shape(row.shape, self.dims)}"
            if row.reference_shape is None:
                theirs, status = "-", Text("no counterpart", style="dim")
            else:
                theirs = row.reference_name
                if row.reference_shape != row.shape:
                    theirs += f" {format_shape(row.reference_shape, self.dims)}"
                label = (row.status or "-") if row.max_abs is None or row.status in (
                    "same", "shape") else f"{row.status}, max abs {row.max_abs:.2e}"
                status = Text(label, style=_STYLE.get(row.status, ""))
            table.add_row(f"  {row.role}", yours, theirs, status)
        return table

    def __str__(self) -> str:
        return render_text(self)

    def _repr_html_(self) -> str:
        return render_html(self)


def _table(title: str, reference_title: str, rows: list[Drift]) -> Table:
    if reference_title and all(row.reference_module == row.module for row in rows):
        title, reference_title = f"{title} (same path in both)", ""  # one column: fits 80
    shown = rows
    if len(rows) > _TABLE_ROWS:
        shown = [row for row in rows if row.status != "same"][:_TABLE_ROWS - 1]
        shown = [*shown, rows[-1]] if rows[-1] not in shown else shown
    table = Table(title=None if len(shown) == len(rows)
                  else f"{len(shown)} of {len(rows)} rows (the others are the same)")
    table.add_column(title, overflow="fold")
    if reference_title:
        table.add_column(reference_title, overflow="fold")
    table.add_column("max abs", justify="right")
    table.add_column("max rel", justify="right")
    table.add_column("status")
    for row in shown:
        cells: list[str | Text] = [row.module or "(model)"]
        if reference_title:
            cells.append(row.reference_module or "(model)")
        cells += [f"{row.max_abs:.2e}", f"{row.max_rel:.2e}",
                  Text(row.status, style=_STYLE.get(row.status, ""))]
        table.add_row(*cells)
    return table

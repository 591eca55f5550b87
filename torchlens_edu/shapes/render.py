"""How a ShapeTrace looks: a rich tree that folds repeated identical blocks, and trace diffs.

Everything here runs when a trace is shown, never while the model runs: the tracer keeps bare
``torch.Size`` objects and the names, text and folding are computed from them here.

Ops on one source line are shown as one row, from the tensors that enter the line to the ones
that leave it: ``gpt2.py:57 q = q.view(B, T, nh, hs).transpose(1, 2)  (B, T, C) -> (B, nh, T, hs)``.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from torchlens_edu._core.console import render_text
from torchlens_edu._core.formatting import format_bytes, format_count, format_si, short_dtype
from torchlens_edu._core.frames import source_location
from torchlens_edu._core.modules import also_reachable
from torchlens_edu.dims import AxisRoles, Dims
from torchlens_edu.shapes.events import ShapeEvent, Spec

_INDEXED = re.compile(r"^(.*?)(\d+)$")

# A module event index, or the op events of one source line (Union: a runtime alias on 3.10).
Item = Union[int, list[int]]  # noqa: UP007


def trace_tree(events: list[ShapeEvent], dims: Dims, *, roots: Sequence[str] = (),
               ops: bool = False, meta: bool = False, error: str = "",
               axes: Mapping[int, AxisRoles] | None = None, notes: Sequence[str] = ()) -> Tree:
    """A trace's events as a rich Tree: modules nest, identical sibling blocks fold into one
    row. ``roots`` names the traced models; ``ops``/``meta`` say how it was recorded;
    ``axes`` what the axes of the model's weights are, by ``id`` (op operands); ``notes``
    what a plain run would do differently, under the header."""
    children: dict[int, list[int]] = {}
    for index, event in enumerate(events):
        children.setdefault(event.parent, []).append(index)
    kinds = "modules and ops" if ops else "modules"
    mode = "; shape-only run on meta tensors" if meta else ""
    header = Text.assemble(("ShapeTrace", "bold"), f" of {', '.join(roots) or 'a model'}: "
                           f"{len(events)} events ({kinds}{mode})")
    if len(dims):
        header.append("\n" + "dims  " + ", ".join(f"{k}={v}" for k, v in dims.items()), "dim")
    for note in notes:
        header.append("\nnote  " + note, "yellow")
    tree = Tree(header, guide_style="dim")
    _add_items(tree, _items(children.get(-1, []), events), "", events, children,
               _Names(dims=dims, axes=axes or {}))
    if error:
        tree.add(Text(error, style="red"))
    return tree


def _items(indices: list[int], events: list[ShapeEvent]) -> list[Item]:
    """Module events stay single; consecutive ops of one source line become one group."""
    items: list[Item] = []
    for index in indices:
        event = events[index]
        if event.kind == "module":
            items.append(index)
            continue
        last = items[-1] if items else None
        if isinstance(last, list) and _same_line(events[last[-1]], event):
            last.append(index)
        else:
            items.append([index])
    return items


def _same_line(a: ShapeEvent, b: ShapeEvent) -> bool:
    return bool(a.filename) and (a.filename, a.line, a.path) == (b.filename, b.line, b.path)


@dataclass(frozen=True, kw_only=True)
class _Names:
    """What names the axes in a tree: the trace's dims, and the roles of the weights' axes."""

    dims: Dims
    axes: Mapping[int, AxisRoles]


def _add_items(node: Tree, items: list[Item], base: str, events: list[ShapeEvent],
               children: dict[int, list[int]], naming: _Names) -> None:
    for run in _runs(items, base, events, children):
        first = run[0]
        if isinstance(first, list):
            node.add(_op_row(first, events, naming))
            continue
        dims = naming.dims
        blocks = [i for i in run if isinstance(i, int)]  # a run of modules holds modules only
        event = events[first]
        rel = _relative(event.path, base)
        if len(blocks) > 1:
            last = _relative(events[blocks[-1]].path, base).rsplit(".", 1)[-1]
            label = _module_row(event, f"{rel}..{last}", dims)
            label.append(f"  (x{len(blocks)}, identical shapes)", "bold magenta")
        else:
            label = _module_row(event, rel, dims)
        child = node.add(label)
        sub = _items(children.get(first, []), events)
        _add_items(child, sub, event.path, events, children, naming)


def _runs(items: list[Item], base: str, events: list[ShapeEvent],
          children: dict[int, list[int]]) -> Iterator[list[Item]]:
    """Consecutive siblings ``x.0, x.1, ...`` with identical shapes throughout, as one run."""
    run: list[Item] = []
    for item in items:
        if run and _continues(run, item, events, children):
            run.append(item)
            continue
        if run:
            yield run
        run = [item]
    if run:
        yield run


def _continues(run: list[Item], item: Item, events: list[ShapeEvent],
               children: dict[int, list[int]]) -> bool:
    first, prev = run[0], run[-1]
    if isinstance(first, list) or isinstance(prev, list) or isinstance(item, list):
        return False
    a, b = _INDEXED.match(events[prev].path), _INDEXED.match(events[item].path)
    if not (a and b and a.group(1) == b.group(1) and int(b.group(2)) == int(a.group(2)) + 1):
        return False
    return _signature(first, events, children) == _signature(item, events, children)


def _signature(index: int, events: list[ShapeEvent],
               children: dict[int, list[int]]) -> tuple[Any, ...]:
    """What must match for two blocks to fold: names, shapes, dtypes, lines; not times."""
    event = events[index]
    subs: list[tuple[Any, ...]] = []
    for child in children.get(index, []):
        c = events[child]
        if c.kind == "module":
            subs.append((_relative(c.path, event.path), _signature(child, events, children)))
        else:
            subs.append((c.name, c.inputs, c.outputs, c.filename, c.line, c.failed))
    return (event.name, event.inputs, event.outputs, event.failed, tuple(subs))


def _relative(path: str, base: str) -> str:
    if base and path.startswith(base + "."):
        return path[len(base) + 1:]
    return path


def _specs_text(specs: tuple[Spec, ...] | list[Spec], dims: Dims,
                axes: Sequence[AxisRoles | None] = ()) -> str:
    """``(B=2, T=8, C=64), (3C=192, C=64)``; ``axes``: the roles of each spec's axes if known."""
    if not specs:
        return "—"
    parts = []
    for index, (shape, dtype) in enumerate(specs):
        short = "" if dtype == torch.float32 else short_dtype(dtype)  # float32 goes unsaid
        roles = axes[index] if index < len(axes) else None
        parts.append(dims.format(shape, axes=roles, dtype=dtype) + (f" {short}" if short else ""))
    return ", ".join(parts)


def _module_row(event: ShapeEvent, rel: str, dims: Dims) -> Text:
    text = Text()
    text.append(rel or event.name, "bold")
    if rel:
        text.append(f" {event.name}", "cyan")
    if event.call:
        text.append(f" #{event.call}", "dim")
    elif event.aliases:  # one module under several paths: said once, at its first call
        text.append(f" ({also_reachable([event.path, *event.aliases], event.path)})", "yellow")
    text.append(f"  {_specs_text(event.inputs, dims)} -> ", "")
    if event.failed:
        text.append("✗ failed", "bold red")
    else:
        text.append(_specs_text(event.outputs, dims), "green")
    extras = []
    if event.params:
        extras.append(f"{format_count(event.params)} params")
    if event.seconds is not None:
        extras.append(f"{event.seconds * 1e3:.2f} ms")
    if event.flops:
        extras.append(format_si(event.flops, "FLOP"))
    if event.memory:
        extras.append(format_bytes(event.memory))
    if extras:
        text.append("  " + " · ".join(extras), "dim")
    return text


def _op_row(group: list[int], events: list[ShapeEvent], naming: _Names) -> Text:
    dims = naming.dims
    ops = [events[i] for i in group]
    made: set[int] = set()
    used: set[int] = set()
    ins: list[Spec] = []
    in_axes: list[AxisRoles | None] = []  # a weight's axes are named by its role
    for op in ops:
        for ident, spec in zip(op.in_ids, op.inputs, strict=False):
            if ident not in made and ident not in used:
                ins.append(spec)
                in_axes.append(naming.axes.get(ident))
            used.add(ident)
        made.update(op.out_ids)
    consumed = {i for op in ops for i in op.in_ids}
    outs = [spec for op in ops for ident, spec in zip(op.out_ids, op.outputs, strict=False)
            if ident not in consumed] or list(ops[-1].outputs)
    first = ops[0]
    text = Text()
    if first.folded:  # FSDP's own ops: how many, and which (not its profiler markers)
        names = [n for n in dict.fromkeys(first.folded) if not n.startswith("_")]
        ops_text = f"{len(first.folded)} op{'s' * (len(first.folded) != 1)}"
        return text.append(f"{first.name}: {ops_text}" + (f" ({', '.join(names)})" if names
                                                             else ""), "dim italic")
    if first.filename:
        code = _without_comment(first.code)
        text.append(f"{source_location(first.filename, first.line)} ", "blue")
        text.append(code + "  ", "")
    text.append(", ".join(dict.fromkeys(op.name for op in ops)), "dim italic")
    text.append(f"  {_specs_text(ins, dims, in_axes)} -> ")
    if any(op.failed for op in ops):
        text.append("✗ failed", "bold red")
    else:
        text.append(_specs_text(outs, dims), "green")
    flops = sum(op.flops or 0 for op in ops)
    memory = sum(op.memory or 0 for op in ops)
    extras = [format_si(flops, "FLOP") if flops else "", format_bytes(memory) if memory else ""]
    if any(extras):
        text.append("  " + " · ".join(e for e in extras if e), "dim")
    for op in ops:
        if op.broadcast:
            text.append(f"  ⚠ broadcast: {op.name} of {_specs_text(op.inputs, dims)} makes "
                        f"{_specs_text(op.outputs, dims)}, larger than every operand",
                        "bold yellow")
    return text


def _without_comment(code: str) -> str:
    """The code of a line without its trailing ``# comment`` (a ``#`` in a string stays)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):  # half of a longer statement
        return code
    for token in tokens:
        if token.type == tokenize.COMMENT:
            return code[:token.start[1]].rstrip()
    return code


# --- comparing two traces ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ShapeChange:
    """One difference: an event only in one trace, or with other shapes."""

    change: Literal["added", "removed", "changed"]
    kind: Literal["module", "op"]
    path: str
    name: str
    call: int
    before: str
    after: str
    only_dims: bool = False  # the same shapes in named dims: only a dim's size changed (T)


class TraceDiff:
    """The differences between two ShapeTraces, event by event (falsy when there are none).

    >>> import torch, torchlens_edu as tle
    >>> m = torch.nn.Linear(4, 2)
    >>> d = tle.trace_shapes(m, torch.zeros(3, 4)).diff(tle.trace_shapes(m, torch.zeros(5, 4)))
    >>> [(c.change, c.before, c.after) for c in d.changes]
    [('changed', '(3, 4) -> (3, 2)', '(5, 4) -> (5, 2)')]
    """

    def __init__(self, changes: list[ShapeChange], *,
                 dims: Sequence[tuple[str, int | None, int | None]] = ()) -> None:
        self.changes = changes
        self.dims = list(dims)  # (name, size before, size after) of each dim that changed

    @classmethod
    def between(cls, old_events: Sequence[ShapeEvent], old_dims: Dims,
                new_events: Sequence[ShapeEvent], new_dims: Dims) -> TraceDiff:
        """Compare two traces' events (``ShapeTrace.diff`` calls this), each with its dims."""
        before = {_key(e): e for e in old_events}
        after = {_key(e): e for e in new_events}
        dims = [(name, old_dims.get(name), new_dims.get(name))
                for name in dict.fromkeys([*old_dims, *new_dims])
                if old_dims.get(name) != new_dims.get(name)]
        changes = []
        for key in [*before, *(k for k in after if k not in before)]:
            old, new = before.get(key), after.get(key)
            old_text = _event_shapes(old, old_dims) if old else ""
            new_text = _event_shapes(new, new_dims) if new else ""
            if old and new and (old.inputs, old.outputs) == (new.inputs, new.outputs):
                continue
            kind, path, name, call = key
            change: Literal["added", "removed", "changed"] = (
                "removed" if new is None else "added" if old is None else "changed")
            only_dims = bool(dims) and change == "changed" and (
                _names_only(old_text) == _names_only(new_text))
            changes.append(ShapeChange(change=change, kind=kind, path=path, name=name,
                                       call=call, before=old_text, after=new_text,
                                       only_dims=only_dims))
        return cls(changes, dims=dims)

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"dims": [{"name", "before", "after"}], "changes": [{"change", "kind",
        "path", "name", "call", ...}]}``."""
        return {"dims": [{"name": n, "before": b, "after": a} for n, b, a in self.dims],
                "changes": [vars(c).copy() for c in self.changes]}

    def __rich__(self) -> Any:
        if not self.changes:
            return Text("The two traces have the same shapes everywhere.", style="green")
        parts: list[Any] = []
        if self.dims:  # the cause first: `T: 13 -> 19`, then only what it does not explain
            sizes = ", ".join(f"{name}: {'-' if old is None else old} -> "
                              f"{'-' if new is None else new}" for name, old, new in self.dims)
            parts.append(Text(sizes, style="bold"))
        explained = sum(c.only_dims for c in self.changes)
        if explained:
            count = (f"all {explained} events" if explained == len(self.changes)
                     else f"{explained} of {len(self.changes)} events")
            parts.append(Text(f"{count} have the same shapes in named dims: only those sizes "
                              "changed there", style="dim"))
        rest = [c for c in self.changes if not c.only_dims]
        if rest:
            table = Table(title=f"{len(rest)} shape differences" + (" beyond that" if explained
                                                                    else ""),
                          title_justify="left")
            for column in ("", "event", "before", "after"):
                table.add_column(column)
            marks = {"added": ("+", "green"), "removed": ("-", "red"),
                     "changed": ("~", "yellow")}
            for c in rest:
                mark, style = marks[c.change]
                call = f" #{c.call}" if c.call else ""
                table.add_row(Text(mark, style), f"{c.path or '(model)'} {c.name}{call}",
                              c.before, c.after)
            parts.append(table)
        return Group(*parts)

    def __str__(self) -> str:
        return render_text(self)

    __repr__ = __str__


def _key(event: ShapeEvent) -> tuple[Literal["module", "op"], str, str, int]:
    return (event.kind, event.path, event.name, event.call)


def _event_shapes(event: ShapeEvent, dims: Dims) -> str:
    return f"{_specs_text(event.inputs, dims)} -> {_specs_text(event.outputs, dims)}"


def _names_only(shapes: str) -> str:
    """``(B=1, T=13, 4C=512)`` -> ``(B, T, 4C)``: shapes in named dims, sizes left out (a size
    without a name stays a number, so a change there still counts)."""
    return re.sub(r"\b\d+:(?=[A-Za-z])", "", re.sub(r"(\w+)=\d+", r"\1", shapes))

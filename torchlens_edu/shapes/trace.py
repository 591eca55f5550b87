r"""What a shape trace holds: the :class:`ShapeTrace` of the recorded :class:`ShapeEvent`\ s,
which shows them (rich tree, plain text, HTML), stores them (``to_dict``) and compares them
(``diff``). Events live in ``events.py``, recording in ``tracer.py``, drawing in ``render.py``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torchlens_edu._core.console import render_html, render_text
from torchlens_edu.dims import AxisRoles, Dims
from torchlens_edu.shapes.events import ShapeEvent
from torchlens_edu.shapes.render import TraceDiff, trace_tree


@dataclass(kw_only=True)
class ShapeTrace:
    """The result of a trace: events in call order, the named dims, and the failure if any.

    Show it (``print(tr)``, a rich tree that folds identical repeated blocks), keep it as data
    (``tr.to_dict()``), or compare two (``tr.diff(other)``).

    >>> import torch, torchlens_edu as tle
    >>> from torchlens_edu.models import GPT2, GPT2Config
    >>> tr = tle.trace_shapes(GPT2(GPT2Config.preset("tiny")), torch.zeros(2, 8, dtype=torch.long))
    >>> tr.events[0].output_shapes
    [(2, 8, 256)]
    """

    events: list[ShapeEvent]
    dims: Dims
    ops: bool = False
    meta: bool = False
    error: str = ""  # the explanation, when the forward raised
    roots: list[str] = field(default_factory=list)
    # what a plain run would do differently: PyTorch's fused fast paths (see tracer.py)
    notes: list[str] = field(default_factory=list)
    # id(weight) -> what its axes are (wpe.weight is (ctx, C)): names op operands by role
    axes: dict[int, AxisRoles] = field(default_factory=dict)

    def modules(self, pattern: str = "*") -> list[ShapeEvent]:
        """Module events whose path, or another path of the same module (``event.aliases``),
        matches a glob (``"transformer.h.*.attn"``).

        >>> import torchlens_edu as tle
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> [e.path for e in tle.trace_shapes(m, torch.zeros(2, 4)).modules("*")]
        ['', '0', '1']
        """
        return [e for e in self.events if e.kind == "module" and any(
            fnmatch.fnmatchcase(path, pattern) for path in (e.path, *e.aliases))]

    def ops_at(self, pattern: str = "*") -> list[ShapeEvent]:
        """Op events that ran inside modules whose path matches a glob.

        >>> import torchlens_edu as tle
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> [e.name for e in tle.trace_shapes(m, torch.zeros(2, 4), ops=True).ops_at("0")]
        ['linear']
        """
        return [e for e in self.events if e.kind == "op" and fnmatch.fnmatchcase(e.path, pattern)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"events": [{"kind", "path", "name", "call", "inputs", "outputs",
        "dims", "source"}]}``; ``dims`` holds the named axes of the inputs and outputs.

        >>> import torchlens_edu as tle
        >>> m = torch.nn.Linear(4, 2)
        >>> event = tle.trace_shapes(m, torch.zeros(3, 4), dims={"B": 3}).to_dict()["events"][0]
        >>> event["inputs"], event["dims"]
        ([[3, 4]], {'inputs': [['B=3', '4']], 'outputs': [['B=3', '2']]})
        """
        events = []
        for e in self.events:
            events.append({
                "kind": e.kind, "path": e.path, "name": e.name, "call": e.call,
                "inputs": [list(s) for s in e.input_shapes],
                "outputs": [list(s) for s in e.output_shapes],
                "dims": {"inputs": [self.dims.labels(s, axes) for s, axes in
                                    zip(e.input_shapes, self._input_axes(e), strict=True)],
                         "outputs": [self.dims.labels(s) for s in e.output_shapes]},
                "source": e.source,
                **({"aliases": list(e.aliases)} if e.aliases else {}),
            })
        return {"events": events}

    def _input_axes(self, event: ShapeEvent) -> list[AxisRoles | None]:
        """The roles of an event's operands' axes: known for the model's weights in op events
        (module events keep no operand ids)."""
        if len(event.in_ids) != len(event.inputs):
            return [None] * len(event.inputs)
        return [self.axes.get(ident) for ident in event.in_ids]

    def diff(self, other: ShapeTrace) -> TraceDiff:
        """What changed from this trace to ``other``: a :class:`TraceDiff` (falsy when equal).

        >>> import torchlens_edu as tle
        >>> m = torch.nn.Linear(4, 2)
        >>> a, b = (tle.trace_shapes(m, torch.zeros(n, 4)) for n in (2, 3))
        >>> bool(a.diff(a)), len(a.diff(b))
        (False, 1)
        """
        return TraceDiff.between(self.events, self.dims, other.events, other.dims)

    def __rich__(self) -> Any:
        return trace_tree(self.events, self.dims, roots=self.roots, ops=self.ops,
                          meta=self.meta, error=self.error, axes=self.axes, notes=self.notes)

    def to_text(self, width: int = 100) -> str:
        """The tree as plain text (no colours), ``width`` characters wide.

        >>> import torchlens_edu as tle
        >>> print(tle.trace_shapes(torch.nn.ReLU(), torch.zeros(2)).to_text(60).splitlines()[0])
        ShapeTrace of ReLU: 1 events (modules)
        """
        return render_text(self, width=width)

    def __str__(self) -> str:
        return self.to_text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return render_html(self)

    def __len__(self) -> int:
        return len(self.events)

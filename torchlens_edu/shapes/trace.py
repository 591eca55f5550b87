"""What a shape trace holds: one :class:`ShapeEvent` per module or op call, and the
:class:`ShapeTrace` that shows them (rich tree, plain text, HTML), stores them (``to_dict``)
and compares them (``diff``). Recording lives in ``tracer.py``; drawing in ``render.py``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from torchlens_edu.dims import Dims

Spec = tuple[torch.Size, torch.dtype]  # what an event keeps of a tensor: no data, no reference

# Element-wise ops with several tensor operands: where a surprising broadcast shows up.
_ELEMENTWISE = frozenset({
    "+", "-", "*", "/", "//", "%", "**", "add", "sub", "mul", "div", "true_divide", "rsub",
    "pow", "maximum", "minimum", "where", "==", "!=", "<", "<=", ">", ">=", "eq", "ne", "lt",
    "le", "gt", "ge", "&", "|", "^", "logical_and", "logical_or", "atan2", "hypot", "lerp",
})


@dataclass(slots=True)
class ShapeEvent:
    """One module call or one op call of a traced forward.

    ``path`` is the module's dotted path (for an op: the module it ran in); ``call`` counts the
    calls of the same module (or of the same op in the same module) from 0.

    >>> import torchlens_edu as tle
    >>> event = tle.trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4)).events[0]
    >>> event.kind, event.name, event.input_shapes, event.output_shapes
    ('module', 'Linear', [(3, 4)], [(3, 2)])
    """

    kind: str  # "module" | "op"
    path: str
    name: str  # module class name, or op name such as "view" or "@"
    call: int
    parent: int  # index of the enclosing module event, -1 at the top
    inputs: tuple[Spec, ...]
    outputs: tuple[Spec, ...] = ()
    filename: str = ""  # the user's line: for a module, where it was called
    line: int = 0
    params: int | None = None  # module parameters, counted once
    seconds: float | None = None  # module wall time (real runs only)
    flops: int | None = None  # meta runs
    memory: int | None = None  # bytes of new activations (meta runs)
    failed: bool = False  # the forward raised inside this event
    in_ids: tuple[int, ...] = ()  # op operands / results, to join ops on one source line
    out_ids: tuple[int, ...] = ()

    @property
    def source(self) -> str:
        """``"path/to/file.py:LINE"`` of the user's line, or ``""``."""
        return f"{self.filename}:{self.line}" if self.filename else ""

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(shape) for shape, _ in self.inputs]

    @property
    def output_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(shape) for shape, _ in self.outputs]

    @property
    def broadcast(self) -> bool:
        """An element-wise op whose result is larger than every operand: ``(4,) - (4, 1)``."""
        if self.kind != "op" or self.name not in _ELEMENTWISE or len(self.inputs) < 2:
            return False
        biggest = max(math.prod(shape) for shape, _ in self.inputs)
        return any(math.prod(shape) > biggest for shape, _ in self.outputs)


@dataclass
class ShapeTrace:
    """The result of a trace: events in call order, the named dims, and the failure if any.

    Show it (``print(tr)``, a rich tree that folds identical repeated blocks), keep it as data
    (``tr.to_dict()``), or compare two (``tr.diff(other)``).

    >>> import torchlens_edu as tle
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

    def modules(self, pattern: str = "*") -> list[ShapeEvent]:
        """Module events whose path matches a glob (``"transformer.h.*.attn"``)."""
        return [e for e in self.events
                if e.kind == "module" and fnmatch.fnmatchcase(e.path, pattern)]

    def ops_at(self, pattern: str = "*") -> list[ShapeEvent]:
        """Op events that ran inside modules whose path matches a glob."""
        return [e for e in self.events if e.kind == "op" and fnmatch.fnmatchcase(e.path, pattern)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"events": [{"kind", "path", "name", "call", "inputs", "outputs",
        "dims", "source"}]}``; ``dims`` holds the named axes of the inputs and outputs."""
        events = []
        for e in self.events:
            events.append({
                "kind": e.kind, "path": e.path, "name": e.name, "call": e.call,
                "inputs": [list(s) for s in e.input_shapes],
                "outputs": [list(s) for s in e.output_shapes],
                "dims": {"inputs": [self.dims.labels(s) for s in e.input_shapes],
                         "outputs": [self.dims.labels(s) for s in e.output_shapes]},
                "source": e.source,
            })
        return {"events": events}

    def diff(self, other: ShapeTrace) -> Any:
        """What changed from this trace to ``other``: a :class:`TraceDiff` (falsy when equal)."""
        from torchlens_edu.shapes.render import TraceDiff

        return TraceDiff.between(self, other)

    def __rich__(self) -> Any:
        from torchlens_edu.shapes.render import trace_tree

        return trace_tree(self)

    def to_text(self, width: int = 100) -> str:
        """The tree as plain text (no colours), ``width`` characters wide."""
        from torchlens_edu._core.console import render_text

        return render_text(self, width=width)

    def __str__(self) -> str:
        return self.to_text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from torchlens_edu._core.console import render_html

        return render_html(self)

    def __len__(self) -> int:
        return len(self.events)

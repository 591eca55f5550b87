"""What a shape trace records: one :class:`ShapeEvent` per module or op call, as plain data.

Events keep ``torch.Size`` and dtype pairs, never a tensor: a trace holds no activation alive,
and the user's line as a shared :class:`~torchlens_edu._core.sites.Site` whose source text is
read when the trace is shown, not while the model runs.
The tracer (``tracer.py``) makes them, ``trace.py`` holds them, ``render.py`` draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from torchlens_edu._core.sites import Site

Spec = tuple[torch.Size, torch.dtype]  # what an event keeps of a tensor: no data, no reference

# Element-wise ops with several tensor operands: where a surprising broadcast shows up.
_ELEMENTWISE = frozenset({
    "+", "-", "*", "/", "//", "%", "**", "add", "sub", "mul", "div", "true_divide", "rsub",
    "pow", "maximum", "minimum", "where", "==", "!=", "<", "<=", ">", ">=", "eq", "ne", "lt",
    "le", "gt", "ge", "&", "|", "^", "logical_and", "logical_or", "atan2", "hypot", "lerp",
})


@dataclass(slots=True, kw_only=True)
class ShapeEvent:
    """One module call or one op call of a traced forward.

    ``path`` is the module's dotted path (for an op: the module it ran in); ``call`` counts the
    calls of the same module (or of the same op in the same module) from 0. A module reachable
    under several paths is recorded once per call, under one path; ``aliases`` are the others.

    >>> import torchlens_edu as tle
    >>> event = tle.trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4)).events[0]
    >>> event.kind, event.name, event.input_shapes, event.output_shapes
    ('module', 'Linear', [(3, 4)], [(3, 2)])
    """

    kind: Literal["module", "op"]
    path: str
    name: str  # module class name, or op name such as "view" or "@"
    call: int
    parent: int  # index of the enclosing module event, -1 at the top
    inputs: tuple[Spec, ...]
    outputs: tuple[Spec, ...] = ()  # a module's are filled in when it returns
    site: Site | None = None  # the user's line: for a module, where it was called
    params: int | None = None  # module parameters, counted once
    seconds: float | None = None  # module wall time (real runs that returned)
    flops: int | None = None  # meta runs that returned
    memory: int | None = None  # bytes of new activations (meta runs)
    failed: bool = False  # the forward raised inside this event
    in_ids: tuple[int, ...] = ()  # op operands / results, to join ops on one source line
    out_ids: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()  # the module's other paths (one module under two parents)
    folded: tuple[str, ...] = ()  # FSDP's own ops, one name per call, shown as this one row

    @property
    def filename(self) -> str:
        """The file of the user's line (``""`` when unknown).

        >>> import torchlens_edu as tle
        >>> tle.trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4)).events[0].filename != ""
        True
        """
        return self.site.filename if self.site is not None else ""

    @property
    def line(self) -> int:
        """The number of the user's line (0 when unknown).

        >>> import torchlens_edu as tle
        >>> tle.trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4)).events[0].line > 0
        True
        """
        return self.site.line if self.site is not None else 0

    @property
    def code(self) -> str:
        """The source text of the user's line, stripped (``""`` when unknown); read from the
        file the first time a trace shows that line.

        >>> import torchlens_edu as tle
        >>> class Double(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * 2
        >>> tle.trace_shapes(Double(), torch.zeros(3), ops=True).events[1].code
        'return x * 2'
        """
        return self.site.text if self.site is not None else ""

    @property
    def source(self) -> str:
        """``"path/to/file.py:LINE"`` of the user's line, or ``""``.

        >>> import torchlens_edu as tle
        >>> event = tle.trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4)).events[0]
        >>> event.source == f"{event.filename}:{event.line}" and event.line > 0
        True
        """
        return f"{self.filename}:{self.line}" if self.filename else ""

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the tensors that went in.

        >>> import torchlens_edu as tle
        >>> tle.trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4)).events[0].input_shapes
        [(3, 4)]
        """
        return [tuple(shape) for shape, _ in self.inputs]

    @property
    def output_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the tensors that came out.

        >>> import torchlens_edu as tle
        >>> tle.trace_shapes(torch.nn.Linear(4, 2), torch.zeros(3, 4)).events[0].output_shapes
        [(3, 2)]
        """
        return [tuple(shape) for shape, _ in self.outputs]

    @property
    def broadcast(self) -> bool:
        """An element-wise op whose result is larger than every operand: ``(4,) - (4, 1)``.

        >>> import torchlens_edu as tle
        >>> class Center(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x - x.mean(-1)  # meant keepdim=True: (4, 1) - (4,) is (4, 4)
        >>> trace = tle.trace_shapes(Center(), torch.zeros(4, 1), ops=True)
        >>> [(e.name, e.broadcast) for e in trace.events if e.kind == "op"]
        [('mean', False), ('sub', True)]
        """
        if self.kind != "op" or self.name not in _ELEMENTWISE or len(self.inputs) < 2:
            return False
        biggest = max(math.prod(shape) for shape, _ in self.inputs)
        return any(math.prod(shape) > biggest for shape, _ in self.outputs)

"""Shape assertions: ``assert_shape(t, "B T C", B=2)`` checks a shape against named axes.

Inside ``with shape_scope():`` a name keeps the size it was first seen with, so "T must be the
same T everywhere" holds across calls; a mismatch is a :class:`ShapeError` (an
``AssertionError``) that says which axis, which size, and where the name was bound.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Any

from torchlens_edu._core.formatting import did_you_mean
from torchlens_edu._core.frames import user_source
from torchlens_edu.dims import Dims

_SCOPE: ContextVar[ShapeScope | None] = ContextVar("torchlens_edu_shape_scope", default=None)
_DERIVED = re.compile(r"^(\d+)\*?([A-Za-z_]\w*)$")  # "3C" or "3*C": three times C


class ShapeError(AssertionError):
    """A shape disagrees with the spec given to :func:`assert_shape`.

    An ``AssertionError``, so pytest reports it as a failed assertion and plain code can catch it.

    >>> import torch
    >>> try:
    ...     assert_shape(torch.zeros(2, 3), "B T C")
    ... except ShapeError as e:
    ...     print(str(e).splitlines()[0])
    expected 3 axes (B, T, C), got 2: (2, 3)
    """


class ShapeScope(Mapping[str, int]):
    """Sizes bound by :func:`assert_shape` while the scope is active: a mapping ``name -> size``.

    A nested scope sees the sizes of the scopes around it; what it binds itself is forgotten
    when it exits. Entering a scope again starts it afresh from the sizes it was made with.

    >>> import torch
    >>> with shape_scope(B=2) as scope:
    ...     _ = assert_shape(torch.zeros(2, 8, 32), "B T C")
    >>> dict(scope)
    {'B': 2, 'T': 8, 'C': 32}
    """

    def __init__(self, sizes: Mapping[str, int] | None = None) -> None:
        self._given = dict(Dims(sizes))  # validates names and sizes
        self._made_at = _where(user_source())
        self._bound: dict[str, tuple[int, str]] = {}  # name -> (size, how it got that size)
        self._parent: ShapeScope | None = None
        self._tokens: list[Token[ShapeScope | None]] = []

    def __enter__(self) -> ShapeScope:
        self._parent = _SCOPE.get()
        self._bound = {name: (size, f"given to shape_scope() at {self._made_at}")
                       for name, size in self._given.items()}
        self._tokens.append(_SCOPE.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _SCOPE.reset(self._tokens.pop())

    def binding(self, name: str) -> tuple[int, str] | None:
        """``(size, how it was bound)`` for ``name`` in this scope or the ones around it."""
        scope: ShapeScope | None = self
        while scope is not None:
            if name in scope._bound:
                return scope._bound[name]
            scope = scope._parent
        return None

    def _all(self) -> dict[str, int]:
        outer = self._parent._all() if self._parent is not None else {}
        return {**outer, **{name: size for name, (size, _) in self._bound.items()}}

    def __getitem__(self, name: str) -> int:
        found = self.binding(name)
        if found is None:
            raise KeyError(name)
        return found[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return "ShapeScope(" + ", ".join(f"{k}={v}" for k, v in self._all().items()) + ")"


def shape_scope(**sizes: int) -> ShapeScope:
    """A block in which every name given to :func:`assert_shape` means one size throughout.

    ``sizes`` pre-binds names (e.g. ``shape_scope(B=2, C=768)``); the others are bound by the
    first :func:`assert_shape` that sees them.

    >>> import torch
    >>> with shape_scope():
    ...     _ = assert_shape(torch.zeros(2, 8, 32), "B T C")
    ...     _ = assert_shape(torch.zeros(2, 9), "B T")
    Traceback (most recent call last):
    ...
    torchlens_edu.asserts.ShapeError: expected (B, T), got (B=2, T=9)
      T: 9 on axis 1, but T=8 was bound at <doctest torchlens_edu.asserts.shape_scope[1]>:2
    """
    return ShapeScope(sizes)


def _parse_spec(spec: str | Sequence[str | int | None]) -> list[tuple[str, Any]]:
    """Tokens ``("name", "T")``, ``("int", 3)``, ``("mul", (3, "C"))``, ``("any", None)``,
    ``("rest", None)`` from ``"B T 3C"`` or ``["B", "T", 768]``."""
    if isinstance(spec, str):
        items: list[Any] = spec.strip().strip("()[]").replace(",", " ").split()
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise TypeError(f"assert_shape: the spec must be a string like 'B T C' or a list like "
                        f"['B', 'T', 768], not {type(spec).__name__}")
    tokens: list[tuple[str, Any]] = []
    for item in items:
        if item is None or item == "_":
            tokens.append(("any", None))
        elif item is Ellipsis or item == "...":
            tokens.append(("rest", None))
        elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            tokens.append(("int", item))
        elif isinstance(item, str) and item.isdigit():
            tokens.append(("int", int(item)))
        elif isinstance(item, str) and item.isidentifier():
            tokens.append(("name", item))
        elif isinstance(item, str) and (m := _DERIVED.match(item)):
            tokens.append(("mul", (int(m.group(1)), m.group(2))))
        else:
            raise ValueError(f"assert_shape: cannot read {item!r} in the spec {spec!r}; use names "
                             f"(B, T, C), sizes (768), multiples (3C), '_' (any) or '...'")
    if sum(kind == "rest" for kind, _ in tokens) > 1:
        raise ValueError(f"assert_shape: the spec {spec!r} has more than one '...'")
    return tokens


def _token_text(kind: str, value: Any) -> str:
    return {"name": lambda: value, "int": lambda: str(value), "any": lambda: "_",
            "rest": lambda: "...", "mul": lambda: f"{value[0]}{value[1]}"}[kind]()


def _where(source: str) -> str:
    path, _, line = source.rpartition(":")
    return f"{os.path.basename(path)}:{line}" if path else "this call"


def assert_shape(t: Any, spec: str | Sequence[str | int | None], **sizes: int) -> Any:
    """Check ``t``'s shape against named axes and return ``t`` unchanged.

    ``spec`` is ``"B T C"`` (spaces or commas) or a list ``["B", "T", 768]``; an axis is a name, a
    size, a multiple of a name (``"3C"``), ``"_"`` (any size) or ``"..."`` (any number of axes).
    ``sizes`` fixes names for this call. Inside :func:`shape_scope` a name keeps the size it was
    first bound to. A mismatch raises :class:`ShapeError` showing the actual shape with names.

    >>> import torch
    >>> x = torch.zeros(2, 8, 96)
    >>> assert_shape(x, "B T 3C", C=32).shape
    torch.Size([2, 8, 96])
    >>> assert_shape(x, ["B", "T", 768])
    Traceback (most recent call last):
    ...
    torchlens_edu.asserts.ShapeError: expected (B, T, 768), got (B=2, T=8, 96)
      axis 2: 96, but the spec says 768
    """
    # a nested tensor (nn.TransformerEncoder's padding fast path) raises on .shape itself
    if getattr(type(t), "is_nested", None) is not None and t.is_nested:
        parts = ", ".join(str(list(c.shape)) for c in t.unbind()[:3])
        raise TypeError(f"assert_shape got a nested tensor, which has no single shape (its "
                        f"components: {parts}{', ...' if t.size(0) > 3 else ''}): check each "
                        f"component (for c in t.unbind(): assert_shape(c, ...)), or its padded "
                        f"form (assert_shape(t.to_padded_tensor(0.0), ...))")
    if not isinstance(t, (tuple, list)) and not hasattr(t, "shape"):
        raise TypeError(f"assert_shape checks a tensor (anything with a .shape) or a shape "
                        f"tuple, got {type(t).__name__}: assert_shape(x, 'B T C')")
    shape = tuple(int(s) for s in (t if isinstance(t, (tuple, list)) else t.shape))
    tokens = _parse_spec(spec)
    given = dict(Dims(sizes))
    names = {v for k, v in tokens if k == "name"} | {v[1] for k, v in tokens if k == "mul"}
    if unknown := sorted(set(given) - names):
        hint = did_you_mean(unknown[0], names, quote=False)
        hint = f"{hint} " if hint else ""
        raise ValueError(f"assert_shape: {', '.join(unknown)} not in the spec {spec!r}; {hint}"
                         f"to fix sizes for several checks, use `with shape_scope(...)`")
    expected = "(" + ", ".join(_token_text(k, v) for k, v in tokens) + ")"
    scope = _SCOPE.get()
    source = f"bound at {_where(user_source())}"

    # Align tokens with axes: those before "..." from the left, those after it from the right.
    kinds = [k for k, _ in tokens]
    fixed = len(tokens) - ("rest" in kinds)
    if len(shape) < fixed or ("rest" not in kinds and len(shape) != fixed):
        named = Dims({**(dict(scope) if scope is not None else {}), **given}).format(shape)
        axes = f"at least {fixed}" if "rest" in kinds else str(fixed)
        noun = "axis" if fixed == 1 else "axes"
        raise ShapeError(f"expected {axes} {noun} {expected}, got {len(shape)}: {named}")
    split = kinds.index("rest") if "rest" in kinds else len(tokens)
    after = tokens[split + 1:]
    placed = [(axis, *tok) for axis, tok in enumerate(tokens[:split])]
    placed += [(len(shape) - len(after) + i, *tok) for i, tok in enumerate(after)]

    bound: dict[str, tuple[int, str]] = {}  # names first seen in this call

    def known(name: str) -> list[tuple[int, str]]:
        found = [(given[name], f"{name}={given[name]} was given")] if name in given else []
        outer = scope.binding(name) if scope is not None else None
        if outer is not None:
            found.append((outer[0], f"{name}={outer[0]} was {outer[1]}"))
        if not found and name in bound:
            found.append((bound[name][0], f"{name}={bound[name][0]} on axis {bound[name][1]}"))
        return found

    problems: dict[int, str] = {}
    labels = {axis: str(shape[axis]) for axis in range(len(shape))}
    # plain names and sizes first, so that a multiple ("3C") can use C from anywhere in the spec
    for axis, kind, value in sorted(placed, key=lambda p: p[1] == "mul"):
        size = shape[axis]
        if kind == "int" and size != value:
            problems[axis] = f"axis {axis}: {size}, but the spec says {value}"
        elif kind == "name":
            labels[axis] = f"{value}={size}"
            for want, why in known(value):
                if size != want:
                    problems.setdefault(axis, f"{value}: {size} on axis {axis}, but {why}")
            if not known(value):
                bound[value] = (size, str(axis))
        elif kind == "mul":
            factor, name = value
            labels[axis] = f"{factor}{name}={size}"
            wants = known(name)
            for want, why in wants:
                if size != factor * want:
                    problems.setdefault(axis, f"{factor}{name}: {size} on axis {axis}, but "
                                              f"{why} (so {factor}{name}={factor * want})")
            if not wants:
                if size % factor:
                    problems[axis] = (f"{factor}{name}: {size} on axis {axis} is not a multiple "
                                      f"of {factor}")
                else:
                    bound[name] = (size // factor, str(axis))
    if problems:
        got = "(" + ", ".join(labels[a] for a in range(len(shape))) + ")"
        lines = [problems[a] for a in sorted(problems)]
        raise ShapeError(f"expected {expected}, got {got}\n  " + "\n  ".join(lines))
    if scope is not None:
        for name, (size, _) in bound.items():
            scope._bound[name] = (size, source)
        for name, size in given.items():
            scope._bound.setdefault(name, (size, source))
    return t

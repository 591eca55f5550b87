"""Named dimensions: give the sizes in a shape the names a learner uses (``B, T, C, nh, hs``).

Names come from three places, strongest first: what the user says (``dims={"B": 2}``), the
inputs of a run (``B`` and ``T`` of the token ids), and the model's config (``n_embd`` is ``C``,
``n_head`` is ``nh``, and so on, for our GPT-2, Hugging Face and TransformerLens configs).

When two names share a size (``T == hs == 64``) we never guess silently: the size prints as
``64:T|hs`` unless its position settles it (the batch axis first, a feature axis last).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Any

import torch

from torchlens_edu._core.frames import user_source

# role -> config attribute names that carry it (ours, Hugging Face, TransformerLens, others)
_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "C": ("n_embd", "hidden_size", "d_model", "dim", "embed_dim"),
    "nh": ("n_head", "num_attention_heads", "num_heads", "n_heads", "encoder_attention_heads"),
    "hs": ("head_dim", "d_head", "d_kv"),
    "V": ("vocab_size", "d_vocab"),
    "ctx": ("n_positions", "max_position_embeddings", "n_ctx", "block_size"),
    "ff": ("n_inner", "intermediate_size", "d_ff", "d_mlp", "ffn_dim", "encoder_ffn_dim"),
    "nkv": ("num_key_value_heads", "n_key_value_heads"),
}
# Axes that hold features; the last axis of a 3-D+ activation is one of these.
_FEATURE_ROLES = frozenset({"C", "hs", "V", "3C", "4C", "ff", "2C"})


def _config_of(model: Any) -> Any:
    for attr in ("config", "cfg"):
        config = getattr(model, attr, None)
        if config is not None:
            return config
    return None


def _first_int(config: Any, names: Iterable[str]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def dims_from_config(config: Any) -> dict[str, int]:
    """Named sizes a config implies, e.g. ``{"C": 768, "nh": 12, "hs": 64, "V": 50257, ...}``.

    >>> from torchlens_edu.models import GPT2Config
    >>> dims_from_config(GPT2Config.preset("gpt2"))["hs"]
    64
    """
    if config is None:
        return {}
    found = {role: _first_int(config, fields) for role, fields in _CONFIG_FIELDS.items()}
    sizes = {role: size for role, size in found.items() if size is not None}
    C, nh = sizes.get("C"), sizes.get("nh")
    if C and nh and "hs" not in sizes and C % nh == 0:
        sizes["hs"] = C // nh
    if C:
        sizes["3C"] = 3 * C
        ff = sizes.pop("ff", None) or 4 * C
        sizes["4C" if ff == 4 * C else "ff"] = ff
    if sizes.get("nkv") == nh:
        sizes.pop("nkv")
    return sizes


def dims_from_inputs(*inputs: Any) -> dict[str, int]:
    """``B`` and ``T`` read off the first token-id tensor ``(B, T)`` or activation ``(B, T, C)``;
    only ``B`` from images ``(B, ch, H, W)``. A 2-D float input gives nothing: it may be
    ``(B, F)`` or an unbatched ``(T, C)``, and a wrong ``B`` would mislead.

    >>> dims_from_inputs(torch.zeros(2, 16, dtype=torch.long))
    {'B': 2, 'T': 16}
    >>> dims_from_inputs(torch.zeros(8, 3, 32, 32))
    {'B': 8}
    """
    from torchlens_edu._core.tree import iter_tensors

    for tensor in iter_tensors(list(inputs)):
        floating = tensor.is_floating_point()
        if tensor.dim() == 2 and not floating:
            return {"B": tensor.shape[0], "T": tensor.shape[1]}
        if tensor.dim() == 3 and floating:
            return {"B": tensor.shape[0], "T": tensor.shape[1]}
        if tensor.dim() == 4 and floating:
            return {"B": tensor.shape[0]}
    return {}


class Dims(Mapping[str, int]):
    """An ordered mapping ``name -> size`` that formats shapes with names.

    >>> d = Dims({"B": 2, "T": 16, "nh": 12, "hs": 64})
    >>> d.format((2, 12, 16, 64))
    '(B=2, nh=12, T=16, hs=64)'
    >>> Dims({"T": 64, "hs": 64, "C": 768}).format((12, 64, 768))
    '(12, 64:T|hs, C=768)'
    """

    def __init__(self, sizes: Mapping[str, int] | None = None) -> None:
        self._sizes: dict[str, int] = {}
        for name, size in (sizes or {}).items():
            if not isinstance(name, str) or not (name.isidentifier() or name[:1].isdigit()):
                raise ValueError(f"dimension name {name!r} must be a short word such as 'B' or 'T'")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"dimension {name}={size!r}: the size must be a non-negative int")
            self._sizes[name] = size

    @classmethod
    def infer(cls, model: Any = None, inputs: Sequence[Any] = (),
              overrides: Mapping[str, int] | None = None) -> Dims:
        """Names from the user's overrides, then the inputs, then the model's config.

        >>> from torchlens_edu.models import GPT2, GPT2Config
        >>> m = GPT2(GPT2Config.preset("tiny"))
        >>> Dims.infer(m, [torch.zeros(1, 8, dtype=torch.long)])["T"]
        8
        """
        sizes: dict[str, int] = dict(overrides or {})
        for source in (dims_from_inputs(*inputs), dims_from_config(_config_of(model))):
            for name, size in source.items():
                sizes.setdefault(name, size)
        return cls(sizes)

    def merged(self, other: Mapping[str, int]) -> Dims:
        """A copy where ``other``'s names win."""
        return Dims({**self._sizes, **dict(other)})

    def __getitem__(self, name: str) -> int:
        return self._sizes[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return "Dims(" + ", ".join(f"{k}={v}" for k, v in self._sizes.items()) + ")"

    def names_for(self, size: int) -> list[str]:
        """All names whose size is ``size``, strongest first."""
        return [name for name, value in self._sizes.items() if value == size]

    def labels(self, shape: Sequence[int]) -> list[str]:
        """One label per axis: ``"B=2"``, ``"64:T|hs"`` (ambiguous) or ``"7"`` (unnamed).

        >>> Dims({"B": 2, "nh": 2, "T": 8}).labels((2, 2, 8))
        ['B=2', 'nh=2', 'T=8']
        """
        shape = [int(s) for s in shape]
        candidates = [self._candidates(shape, axis) for axis in range(len(shape))]
        # A name the position gave to one axis is not a candidate for another axis:
        # in (2, 2, 8) with B = nh = 2, axis 0 is B, so axis 1 is nh.
        settled = {names[0] for names in candidates if len(names) == 1}
        labels = []
        for size, names in zip(shape, candidates, strict=True):
            if len(names) > 1:
                names = [n for n in names if n not in settled] or names
            if size == 1 and names != ["B"]:
                labels.append("1")  # a kept or broadcast axis; calling it T would mislead
            elif not names:
                labels.append(str(size))
            elif len(names) == 1:
                labels.append(f"{names[0]}={size}")
            else:
                labels.append(f"{size}:" + "|".join(names))
        return labels

    def _candidates(self, shape: list[int], axis: int) -> list[str]:
        size = shape[axis]
        names = self.names_for(size)
        if size == 1:
            return ["B"] if axis == 0 and names[:1] == ["B"] else []
        if len(names) > 1:
            names = _settle_by_position(names, axis, shape, "B" in self.names_for(shape[0]))
        return names

    def format(self, shape: Sequence[int] | torch.Size, *, brackets: str = "()") -> str:
        """``(B=2, T=16, C=768)``; with ``brackets="[]"`` for one-line summaries."""
        return brackets[0] + ", ".join(self.labels(shape)) + brackets[1]


def _settle_by_position(names: list[str], axis: int, shape: list[int],
                        batch_first: bool) -> list[str]:
    """The batch axis comes first; a lone feature axis comes last. Nothing else is guessed:
    in (B, nh, 64, 64) with T = hs = 64 the last axis may be hs (q) or T (attention scores)."""
    ndim = len(shape)
    if axis == 0 and ndim >= 2 and "B" in names:
        return ["B"]
    # 2-D: (T, C) has its features last, (B, T) token ids do not.
    features_last = ndim >= 3 or (ndim == 2 and not batch_first)
    if axis == ndim - 1 and features_last and shape.count(shape[axis]) == 1:
        features = [n for n in names if n in _FEATURE_ROLES]
        if len(features) == 1:
            return features
    return names


def format_shape(shape: Sequence[int] | torch.Size, dims: Mapping[str, int] | None = None,
                 *, brackets: str = "()") -> str:
    """Format a shape with names when ``dims`` knows them, else plainly.

    >>> format_shape((2, 16, 768), {"B": 2, "T": 16, "C": 768})
    '(B=2, T=16, C=768)'
    >>> format_shape((3, 4))
    '(3, 4)'
    """
    named = dims if isinstance(dims, Dims) else Dims(dims)
    return named.format(shape, brackets=brackets)


# --- Shape assertions ------------------------------------------------------------------------
# assert_shape(t, "B T C", B=2) checks a shape against named axes; inside `with shape_scope():`
# a name keeps the size it was first seen with, so "T must be the same T everywhere" holds.

_SCOPE: ContextVar[ShapeScope | None] = ContextVar("torchlens_edu_shape_scope", default=None)
_DERIVED = re.compile(r"^(\d+)\*?([A-Za-z_]\w*)$")  # "3C" or "3*C": three times C


class ShapeError(AssertionError):
    """A shape disagrees with the spec given to :func:`assert_shape`.

    An ``AssertionError``, so pytest reports it as a failed assertion and plain code can catch it.

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

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return "ShapeScope(" + ", ".join(f"{k}={v}" for k, v in self._all().items()) + ")"


def shape_scope(**sizes: int) -> ShapeScope:
    """A block in which every name given to :func:`assert_shape` means one size throughout.

    ``sizes`` pre-binds names (e.g. ``shape_scope(B=2, C=768)``); the others are bound by the
    first :func:`assert_shape` that sees them.

    >>> with shape_scope():
    ...     _ = assert_shape(torch.zeros(2, 8, 32), "B T C")
    ...     _ = assert_shape(torch.zeros(2, 9), "B T")
    Traceback (most recent call last):
    ...
    torchlens_edu.dims.ShapeError: expected (B, T), got (B=2, T=9)
      T: 9 on axis 1, but T=8 was bound at <doctest torchlens_edu.dims.shape_scope[0]>:2
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

    >>> x = torch.zeros(2, 8, 96)
    >>> assert_shape(x, "B T 3C", C=32).shape
    torch.Size([2, 8, 96])
    >>> assert_shape(x, ["B", "T", 768])
    Traceback (most recent call last):
    ...
    torchlens_edu.dims.ShapeError: expected (B, T, 768), got (B=2, T=8, 96)
      axis 2: 96, but the spec says 768
    """
    shape = tuple(int(s) for s in (t if isinstance(t, (tuple, list)) else t.shape))
    tokens = _parse_spec(spec)
    given = dict(Dims(sizes))
    names = {v for k, v in tokens if k == "name"} | {v[1] for k, v in tokens if k == "mul"}
    if unknown := sorted(set(given) - names):
        close = [n for n in names if n.lower() == unknown[0].lower()]
        close = close or difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
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
        raise ShapeError(f"expected {axes} axes {expected}, got {len(shape)}: {named}")
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

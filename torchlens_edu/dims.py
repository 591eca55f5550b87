"""Named dimensions: give the sizes in a shape the names a learner uses (``B, T, C, nh, hs``).

Names come from three places, strongest first: what the user says (``dims={"B": 2}``), the
inputs of a run (``B`` and ``T`` of the token ids), and the model's config (``n_embd`` is ``C``,
``n_head`` is ``nh``, and so on, for our GPT-2, Hugging Face and TransformerLens configs).

When two names share a size (``T == hs == 64``) we never guess silently: the size prints as
``64:T|hs`` unless its position settles it (the batch axis first, a feature axis last), or the
tensor's role in its module does (a position embedding's weight is ``(ctx, C)``, a linear
layer's weight holds features: :func:`parameter_axes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.nn.parameter import is_lazy

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

# What each axis of a tensor may be named, from the role it plays in its module; None: any name.
AxisRoles = tuple[frozenset[str] | None, ...]


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
        sizes.pop("nkv", None)
    return sizes


# role -> attribute names a module's own code gives it (minGPT, x-transformers, tutorials)
_MODULE_FIELDS: dict[str, tuple[str, ...]] = {
    "C": ("embed_dim", "d_model"),  # nn.MultiheadAttention, nn.Transformer: no embedding
    "nh": ("n_head", "num_heads", "heads", "n_heads", "num_attention_heads", "nhead"),
    "hs": ("head_dim", "dim_head", "d_head", "head_size", "d_k"),
    "nkv": ("kv_heads", "n_kv_head", "n_kv_heads", "num_key_value_heads", "num_kv_heads"),
}
_MODULE_FIELD_NAMES = frozenset(name for names in _MODULE_FIELDS.values() for name in names)
_POSITION_NAMES = ("wpe", "pos", "position")


def _is_positional(name: str) -> bool:
    """Whether a module or parameter name says position embedding: ``wpe``, ``pos_emb``,
    ``position_embeddings``, TransformerLens' ``W_pos``."""
    return any(n in name.lower() for n in _POSITION_NAMES)


def dims_from_modules(model: Any) -> dict[str, int]:
    """Named sizes read off the modules themselves, for models without a config: the token
    embedding gives ``V`` and ``C`` (the largest ``nn.Embedding``), a position embedding
    (``wpe``, ``pos_emb``...) gives ``ctx``, attributes such as ``embed_dim`` (``C`` without
    a token embedding: ``nn.MultiheadAttention``), ``n_head``, ``heads``,
    ``num_heads``, ``dim_head`` give ``nh``, ``hs`` and ``nkv`` (when every module that has one
    agrees), and the widening ``nn.Linear`` of an MLP gives ``4C`` or ``ff``.

    >>> import torch.nn as nn
    >>> model = nn.ModuleDict({"wte": nn.Embedding(100, 32), "wpe": nn.Embedding(16, 32),
    ...                        "fc": nn.Linear(32, 128)})
    >>> dims_from_modules(model)
    {'V': 100, 'C': 32, 'ctx': 16, '3C': 96, '4C': 128}
    """
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        return {}
    named = list(model.named_modules())
    sizes: dict[str, int] = {}
    embeddings = [(path, m) for path, m in named if isinstance(m, nn.Embedding)]
    positional = [(p, m) for p, m in embeddings if _is_positional(p.rsplit(".", 1)[-1])]
    tokens = [(p, m) for p, m in embeddings if (p, m) not in positional]
    if tokens:
        _, token = max(tokens, key=lambda pm: pm[1].num_embeddings)
        sizes["V"], sizes["C"] = token.num_embeddings, token.embedding_dim
    if positional and positional[0][1].embedding_dim == sizes.get("C"):
        sizes["ctx"] = positional[0][1].num_embeddings
    for role, found in _head_attributes(m for _, m in named).items():
        if role in sizes:  # C from the token embedding
            continue
        if len(found) == 1:  # one value everywhere: a name; two (encoder vs decoder): none
            sizes[role] = found.pop()
    C, nh = sizes.get("C"), sizes.get("nh")
    if C and nh and "hs" not in sizes and C % nh == 0:
        sizes["hs"] = C // nh
    if C:
        sizes["3C"] = 3 * C
        widths = [m.out_features for _, m in named if isinstance(m, nn.Linear)
                  and m.in_features == C and m.out_features > C
                  and m.out_features not in (3 * C, sizes.get("V"))]
        if widths:
            ff = max(set(widths), key=widths.count)
            sizes["4C" if ff == 4 * C else "ff"] = ff
    if sizes.get("nkv") == nh:
        sizes.pop("nkv", None)
    return sizes


def _head_attributes(modules: Iterable[Any]) -> dict[str, set[int]]:
    """Role -> the values of the modules' head attributes (``n_head``, ``dim_head``, ...).

    Only the names a module defines are read: asking ``nn.Module.__getattr__`` for a name it
    lacks raises (and catches) an AttributeError, hundreds per trace, once most of a small
    model's trace time. A name neither in the instance's ``__dict__`` nor on its class would be
    looked up in the parameter, buffer and submodule tables, which never hold an int; a module
    with a ``__getattr__`` of its own (a wrapper that forwards) is asked for every name.
    """
    import torch.nn as nn

    found: dict[str, set[int]] = {role: set() for role in _MODULE_FIELDS}
    on_class: dict[type, frozenset[str]] = {}
    for module in modules:
        cls = type(module)
        if cls not in on_class:
            on_class[cls] = frozenset(n for n in _MODULE_FIELD_NAMES if hasattr(cls, n))
        if cls.__getattr__ is not nn.Module.__getattr__:
            defined: Iterable[str] = _MODULE_FIELD_NAMES
        else:
            defined = on_class[cls].union(vars(module).keys() & _MODULE_FIELD_NAMES)
            if not defined:
                continue  # the common case: a Linear, a LayerNorm, a Dropout
        for role, fields in _MODULE_FIELDS.items():
            value = _first_int(module, [name for name in fields if name in defined])
            if value is not None:
                found[role].add(value)
    return found


_HEADS = frozenset({"nh", "nkv"})
_F = _FEATURE_ROLES
# TransformerLens keeps its weights as named parameters of its own module classes.
_TRANSFORMER_LENS: dict[str, AxisRoles] = {
    "W_E": (frozenset({"V"}), _F), "W_U": (_F, _F),
    "W_Q": (_HEADS, _F, _F), "W_K": (_HEADS, _F, _F), "W_V": (_HEADS, _F, _F),
    "W_O": (_HEADS, _F, _F), "b_Q": (_HEADS, _F), "b_K": (_HEADS, _F), "b_V": (_HEADS, _F),
    "W_in": (_F, _F), "W_out": (_F, _F), "b_in": (_F,), "b_out": (_F,), "b_O": (_F,),
    "b_U": (_F,),
}


def parameter_axes(module_name: str, module: Any, name: str, ndim: int) -> AxisRoles | None:
    """What the axes of ``module``'s own parameter ``name`` are, from the module's role, or None.

    A position embedding (``wpe``, ``pos_emb``, ``W_pos``) is ``(ctx, C)``; a token embedding
    ``(V, C)``; the weights of linear layers, norms and Hugging Face's ``Conv1D`` hold features
    only, never ``B``, ``T`` or ``ctx``. When a size has two names (``C == ctx == 64``) the
    axis' role picks one: ``wpe.weight`` is ``(ctx=64, C=64)``, ``c_proj.weight`` ``(C, C)``.

    >>> import torch.nn as nn
    >>> parameter_axes("wpe", nn.Embedding(64, 64), "weight", 2)[0]
    frozenset({'ctx'})
    >>> parameter_axes("c_proj", nn.Linear(64, 64), "weight", 2)[0] == _FEATURE_ROLES
    True
    """
    import torch.nn as nn

    kind = type(module).__name__
    if ndim == 2 and (_is_positional(module_name) or _is_positional(name)) and (
            isinstance(module, nn.Embedding) or name.startswith("W_")):
        return (frozenset({"ctx"}), _FEATURE_ROLES)
    if isinstance(module, nn.Embedding) and ndim == 2:
        return (frozenset({"V"}), _FEATURE_ROLES)
    if name in _TRANSFORMER_LENS and len(_TRANSFORMER_LENS[name]) == ndim:
        return _TRANSFORMER_LENS[name]
    if isinstance(module, (nn.Linear, nn.LayerNorm)) or kind == "Conv1D" or kind.endswith("Norm"):
        return (_FEATURE_ROLES,) * ndim
    return None


def model_parameter_axes(model: Any) -> dict[int, AxisRoles]:
    """:func:`parameter_axes` of every parameter of ``model``, by ``id`` of the tensor (a
    shape trace knows op operands by id). A tied weight keeps its first module's role:
    GPT-2's ``lm_head.weight`` is ``wte.weight``, ``(V, C)``.

    >>> import torch.nn as nn
    >>> m = nn.ModuleDict({"wte": nn.Embedding(100, 32), "wpe": nn.Embedding(16, 32)})
    >>> model_parameter_axes(m)[id(m["wpe"].weight)][0]
    frozenset({'ctx'})
    """
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        return {}
    axes: dict[int, AxisRoles] = {}
    for path, module in model.named_modules():
        module_name = path.rsplit(".", 1)[-1]
        for name, param in module._parameters.items():
            if param is None or id(param) in axes or is_lazy(param):  # lazy: no size yet
                continue
            roles = parameter_axes(module_name, module, name, param.dim())
            if roles is not None:
                axes[id(param)] = roles
    return axes


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


def dims_argument(dims: Any) -> dict[str, int]:
    """A ``dims=`` argument as a dict, or one clear error: every function that takes ``dims``
    (capture, trace_shapes, watch_nans, inspect, show, describe) checks it here.

    >>> dims_argument({"B": 2}), dims_argument(None)
    ({'B': 2}, {})
    >>> dims_argument("B T C")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: dims='B T C': give a dict of dimension names and their sizes, ...
    """
    if dims is None:
        return {}
    if isinstance(dims, Mapping):
        sizes = dict(dims)
        for name, size in sizes.items():
            if not isinstance(name, str) or not (name.isidentifier() or name[:1].isdigit()):
                raise ValueError(f"dimension name {name!r} must be a short word such as 'B' or 'T'")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"dimension {name}={size!r}: the size must be a non-negative int")
        return sizes
    hint = ("; names alone cannot be matched to sizes" if isinstance(dims, str) or (
        isinstance(dims, (list, tuple)) and all(isinstance(d, str) for d in dims)) else "")
    raise TypeError(f"dims={dims!r}: give a dict of dimension names and their sizes, e.g. "
                    "dims={'B': 8, 'T': 16}, or None (names then come from the inputs and the "
                    f"model's config){hint}")


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
        self._sizes = dims_argument(sizes)

    @classmethod
    def infer(cls, model: Any = None, inputs: Sequence[Any] = (),
              overrides: Mapping[str, int] | None = None) -> Dims:
        """Names from the user's overrides, then the inputs, then the model's config, then its
        modules (embedding and linear sizes, head-count attributes) for what the config lacks.

        >>> from torchlens_edu.models import GPT2, GPT2Config
        >>> m = GPT2(GPT2Config.preset("tiny"))
        >>> Dims.infer(m, [torch.zeros(1, 8, dtype=torch.long)])["T"]
        8
        """
        sizes: dict[str, int] = dict(overrides or {})
        for source in (dims_from_inputs(*inputs), dims_from_config(_config_of(model)),
                       dims_from_modules(model)):
            for name, size in source.items():
                sizes.setdefault(name, size)
        return cls(sizes)

    def merged(self, other: Mapping[str, int]) -> Dims:
        """A copy where ``other``'s names win.

        >>> Dims({"B": 2, "T": 8}).merged({"T": 16, "C": 32})
        Dims(B=2, T=16, C=32)
        """
        return Dims({**self._sizes, **dict(other)})

    def __getitem__(self, name: str) -> int:
        return self._sizes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return "Dims(" + ", ".join(f"{k}={v}" for k, v in self._sizes.items()) + ")"

    def names_for(self, size: int) -> list[str]:
        """All names whose size is ``size``, strongest first.

        >>> Dims({"T": 64, "hs": 64, "C": 768}).names_for(64)
        ['T', 'hs']
        """
        return [name for name, value in self._sizes.items() if value == size]

    def labels(self, shape: Sequence[int], axes: AxisRoles | None = None,
               dtype: torch.dtype | None = None) -> list[str]:
        """One label per axis: ``"B=2"``, ``"64:T|hs"`` (ambiguous) or ``"7"`` (unnamed).

        ``axes``: what each axis may be named, from the tensor's role in its module
        (:func:`parameter_axes`); an axis whose size has no name its role allows stays a number.
        ``dtype``: a complex tensor's last axis stays a number (``view_as_complex`` halved it).

        >>> Dims({"B": 2, "nh": 2, "T": 8}).labels((2, 2, 8))
        ['B=2', 'nh=2', 'T=8']
        >>> Dims({"C": 64, "ctx": 64}).labels((64, 64), (frozenset({"ctx"}), frozenset({"C"})))
        ['ctx=64', 'C=64']
        """
        shape = [int(s) for s in shape]
        if axes is not None and len(axes) != len(shape):
            axes = None  # not the tensor the roles were read from (a view of it, say)
        if dtype is not None and dtype.is_complex and shape:
            # view_as_complex pairs the last axis: its size is half a named one (hs/2 of a
            # rotary embedding), and any name its size happens to match would be wrong
            axes = (*(axes or (None,) * len(shape))[:-1], frozenset())
        candidates = [self._candidates(shape, axis, axes[axis] if axes else None)
                      for axis in range(len(shape))]
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

    def _candidates(self, shape: list[int], axis: int,
                    role: frozenset[str] | None = None) -> list[str]:
        size = shape[axis]
        names = self.names_for(size)
        if role is not None:  # the module says what this axis is: its role decides
            names = [n for n in names if n in role]
        if axis > 0 and "B" in names:  # the batch axis comes first: a later 2 is not B
            names = [n for n in names if n != "B"]
        if size == 1:
            return ["B"] if axis == 0 and names[:1] == ["B"] else []
        if len(names) > 1:
            names = _settle_by_position(names, axis, shape, "B" in self.names_for(shape[0]))
        return names

    def coordinates(self, shape: Sequence[int], index: Sequence[int]) -> str:
        """An element's index with the axes' names: ``B=0, nh=2, T=5, T=3`` (an unnamed axis
        is ``dim2=5``, an ambiguous one ``T|hs=5``).

        >>> Dims({"B": 1, "nh": 4, "T": 6}).coordinates((1, 4, 6, 6), (0, 2, 5, 3))
        'B=0, nh=2, T=5, T=3'
        >>> Dims({"T": 8}).coordinates((8, 7), (3, 1))
        'T=3, dim1=1'
        """
        names = []
        for axis, label in enumerate(self.labels(shape)):
            if "=" in label:
                names.append(label.partition("=")[0])
            elif ":" in label:
                names.append(label.partition(":")[2])
            else:
                names.append(f"dim{axis}")
        return ", ".join(f"{name}={int(i)}" for name, i in zip(names, index, strict=True))

    def format(self, shape: Sequence[int] | torch.Size, *, brackets: str = "()",
               axes: AxisRoles | None = None, dtype: torch.dtype | None = None) -> str:
        """``(B=2, T=16, C=768)``; with ``brackets="[]"`` for one-line summaries; ``axes`` as
        in :meth:`labels`.

        >>> Dims({"B": 2, "T": 16}).format((2, 16, 5), brackets="[]")
        '[B=2, T=16, 5]'
        """
        if not isinstance(shape, (tuple, list)):  # torch.Size is a tuple
            raise TypeError(f"Dims.format takes a shape such as (2, 16, 768) or x.shape, got "
                            f"{type(shape).__name__}")
        return brackets[0] + ", ".join(self.labels(shape, axes, dtype)) + brackets[1]


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
                 *, brackets: str = "()", axes: AxisRoles | None = None,
                 dtype: torch.dtype | None = None) -> str:
    """Format a shape with names when ``dims`` knows them, else plainly; ``axes``: the roles
    of a weight's axes (:func:`parameter_axes`), which settle a size with two names.

    >>> format_shape((2, 16, 768), {"B": 2, "T": 16, "C": 768})
    '(B=2, T=16, C=768)'
    >>> format_shape((3, 4))
    '(3, 4)'
    """
    named = dims if isinstance(dims, Dims) else Dims(dims)
    return named.format(shape, brackets=brackets, axes=axes, dtype=dtype)

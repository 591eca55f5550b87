"""``describe(t)``: everything a learner wants to know about a tensor, on one line.

    Tensor[B=1, T=8, C=768] f32 cpu n=6144 (24 KiB) μ=0.0012 σ=1.002 [-3.41, 3.88] ▁▃▆█▆▃▁▁ NaN:0

Metadata first (it never touches the data, so it is safe on meta/fake tensors and free on CUDA),
then the numbers from ``tensor_stats`` (one host read), then anything alarming.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from torchlens_edu._core.arguments import require_flag
from torchlens_edu._core.formatting import format_bytes, short_dtype
from torchlens_edu.dims import Dims
from torchlens_edu.printing.stats import (
    TensorStats,
    is_dtensor,
    is_fake,
    local_shard,
    tensor_stats,
    unobserved,
)

_SPARK = "▁▂▃▄▅▆▇█"


def describe(t: torch.Tensor, *, dims: Mapping[str, int] | None = None,
             stats: bool = True) -> str:
    """One line: shape (named dims), dtype, device, grad, size, μ/σ/range, sparkline, NaN/Inf.

    ``stats=False`` gives the metadata only: it never reads the data (no device sync), which
    is what a debugger's variables pane wants. Never raises for a tensor, whatever its dtype,
    layout or device; a statistic that cannot be computed is replaced by the reason.

    >>> describe(torch.arange(6.0).reshape(2, 3), dims={"B": 2})
    'Tensor[B=2, 3] f32 cpu n=6 (24 B) μ=2.5 σ=1.871 [0, 5] ██▁██▁██ NaN:0 zeros:1'
    >>> describe(torch.ones(2, 3, device="meta"))
    'Tensor[2, 3] f32 meta n=6 (24 B) (no data)'
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"describe() takes a torch.Tensor, got {type(t).__name__}; "
                        "for a model use tle.inspect(model)")
    require_flag(stats, "stats", "describe")
    named = dims if isinstance(dims, Dims) else Dims(dims)
    with unobserved():  # even reading .shape is seen by torch-function modes: hide our work
        try:
            head = _metadata(t, named)
        except Exception as err:  # exotic subclasses: still say something useful, never raise
            return f"{type(t).__name__} (metadata unavailable: {type(err).__name__}: {err})"
        if not stats:
            return head
        return f"{head} {format_stats(tensor_stats(t), t.dtype)}".rstrip()


def format_stats(s: TensorStats, dtype: torch.dtype) -> str:
    """The numbers half of ``describe``: ``μ=… σ=… [min, max] ▁▃█▃▁ NaN:0``.

    >>> format_stats(tensor_stats(torch.tensor([1, 2, 3])), torch.int64)
    'μ=2 σ=1 [1, 3] █▁▁▁█▁▁█'
    """
    if s.note in ("meta tensor: no data", "fake tensor: no data"):
        return "(no data)"  # a meta/fake DTensor's shard holds no data either
    parts: list[str] = ["local shard:"] if s.local else []
    if s.note == "empty":
        return " ".join([*parts, "empty"])
    if s.mean is not None:
        if s.numel == 1 and s.min is not None:
            parts.append("=" + _num(s.min, dtype))
        elif dtype == torch.bool and s.numel is not None and s.zeros is not None:
            parts.append(f"True:{s.numel - s.zeros}/{s.numel}")
        elif s.min == s.max:
            value = "zeros" if s.min == 0 else _num(s.min, dtype)
            parts.append(("" if s.finite == s.numel else "finite ") + f"all {value}")
        else:
            sigma = "" if s.std is None else f" σ={_num(s.std)}"
            parts.append(f"μ={_num(s.mean)}{sigma} [{_num(s.min, dtype)}, {_num(s.max, dtype)}]")
            if s.hist:
                parts.append(sparkline(s.hist))
    floating = dtype.is_floating_point or dtype.is_complex
    if floating and s.nan is not None:
        parts.append(f"NaN:{s.nan}")
    if s.posinf:
        parts.append(f"+Inf:{s.posinf}")
    if s.neginf:
        parts.append(f"-Inf:{s.neginf}")
    if s.zeros and dtype != torch.bool and (s.numel or 0) > 1 and s.min != s.max:
        parts.append("all zeros" if s.zeros == s.numel else f"zeros:{_count(s.zeros, s.numel)}")
    if s.note:
        parts.append(f"({s.note})")
    return " ".join(parts)


def sparkline(hist: tuple[int, ...]) -> str:
    """Bars for histogram counts; any non-empty bin is at least one step above empty.

    >>> sparkline((0, 1, 4, 8))
    '▁▂▅█'
    """
    top = max(hist, default=0)
    if top <= 0:
        return ""
    steps = len(_SPARK) - 1
    return "".join(_SPARK[-(-c * steps // top)] for c in hist)  # ceil: 1 count shows


def _metadata(t: torch.Tensor, dims: Dims) -> str:
    kind = "Tensor" if type(t) is torch.Tensor or is_fake(t) else type(t).__name__
    if t.is_nested:  # no single shape: list the components'
        shapes = [dims.format(tuple(c.shape), brackets="[]", dtype=t.dtype) for c in t.unbind()]
        shown = ", ".join(shapes[:3]) + (", …" if len(shapes) > 3 else "")
        return f"NestedTensor[{len(shapes)} tensors: {shown}] {short_dtype(t.dtype)} {t.device}"
    parts = [kind + dims.format(tuple(t.shape), brackets="[]", dtype=t.dtype), short_dtype(t.dtype),
             _device(t)]
    if is_dtensor(t):
        parts.append(placement(t))
    if t.layout != torch.strided:
        parts.append(str(t.layout).removeprefix("torch."))
        nnz = t._nnz() if t.layout == torch.sparse_coo else t.values().shape[0]
        parts.append(f"nnz={nnz}")
    if t.is_quantized and t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        parts.append(f"scale={t.q_scale():.4g} zero_point={t.q_zero_point()}")
    if t.grad_fn is not None:
        parts.append(f"grad_fn={type(t.grad_fn).__name__}")
    elif t.requires_grad:
        parts.append("requires_grad")
    if t.dim():
        parts.append(f"n={t.numel()} ({format_bytes(_nbytes(t))})")
    return " ".join(parts)


def placement(t: torch.Tensor) -> str:
    """How a DTensor is laid out, read from its metadata (no collective): placements, mesh
    and this rank's local shape, e.g. ``Shard(0) on mesh(2) local[5, 4]``."""
    names = [
        f"Shard({p.dim})" if p.is_shard() else f"Partial({p.reduce_op})" if p.is_partial()
        else type(p).__name__ + "()"
        for p in t.placements  # type: ignore[attr-defined]
    ]
    mesh = t.device_mesh  # type: ignore[attr-defined]
    sizes = [str(n) if name is None else f"{name}={n}"
             for name, n in zip(mesh.mesh_dim_names or [None] * mesh.ndim, mesh.shape,
                                strict=True)]
    local = ", ".join(str(n) for n in local_shard(t).shape)
    return f"{', '.join(names)} on mesh({', '.join(sizes)}) local[{local}]"


def _device(t: torch.Tensor) -> str:
    if is_fake(t):
        return f"fake:{t.device}"
    return str(t.device)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of this tensor's elements (a view reports its own size, not its base's)."""
    if t.layout == torch.sparse_coo:
        return _nbytes(t._values()) + _nbytes(t._indices())
    if t.layout != torch.strided:
        return sum(_nbytes(p) for p in (t.values(), *_compressed_indices(t)))
    return t.numel() * t.element_size()


def _compressed_indices(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return t.crow_indices(), t.col_indices()
    return t.ccol_indices(), t.row_indices()


def _num(value: float | None, dtype: torch.dtype | None = None) -> str:
    if value is None:
        return "?"
    if isinstance(value, int) or (dtype is not None and not dtype.is_floating_point
                                  and not dtype.is_complex and float(value).is_integer()):
        return str(int(value))
    return f"{value:.4g}"


def _count(k: int, n: int | None) -> str:
    if not n:
        return str(k)
    share = 100 * k / n
    # a share reads better for many zeros (dead ReLUs), a count for a few
    return f"{k}" if n <= 100 or share < 1 else f"{share:.3g}%"

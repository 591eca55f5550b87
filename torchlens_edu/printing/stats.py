"""Summary statistics of any tensor, computed on its own device with one host read.

``tensor_stats(t)`` is what ``describe``, the hooks, the NaN watcher and the pytest helpers print.
It must be cheap and must never raise, whatever the tensor: every dtype (bool, ints, uint16..64,
fp16/bf16/fp8, complex), 0-d, empty, non-contiguous, sparse, quantized, meta and fake tensors.

How it stays cheap:
- every reduction runs where the tensor lives; the results are packed into one small float64
  vector that crosses to the host with a single ``.tolist()`` (on an accelerator: one sync;
  on CPU, where reading a number is free, we also peek to choose the cheapest path);
- float32/float64 CPU tensors without NaN/Inf are reduced in place (``aminmax``, ``sum``,
  ``vector_norm``, ``count_nonzero``: one vectorised pass each, no temporaries);
- float32/float64 tensors on an accelerator are read in place, chunk by chunk, by fused
  elementwise-and-reduce kernels that accumulate in float64 (no float64 copy);
- everything else (other dtypes, other devices, NaN/Inf) is copied chunk by chunk into one
  reusable float64 scratch buffer (never a full-size copy; on CPU a chunk stays in
  cache), reduced there in place, and the chunks' partial moments are merged on the device
  (Chan et al.'s parallel variance);
- the sparkline histogram comes from a fixed, evenly spread sample of a few thousand elements;
- our reductions are hidden from active torch-function/dispatch modes (tracers, NaN watchers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from torchlens_edu._core.interrupts import call_without_grad

HIST_BINS = 8
_SAMPLE = 4096  # elements drawn for the histogram
# elements per chunk: on CPU small enough that a chunk's passes stay in the L2 cache; on
# accelerators large enough that kernel launches do not dominate
_CHUNK = 1 << 16
_DEVICE_CHUNK = 1 << 22  # the least on an accelerator; see _device_chunk
_MAX_DEVICE_CHUNK = 1 << 26
_ROW = 4096  # elements per float32 partial sum of squares on the fast CPU path
# partial moments: count of finite values, their mean and M2 (sum of squared deviations),
# min, max, and counts of NaN, +Inf, -Inf and zeros
_N, _MEAN, _M2, _MIN, _MAX, _NAN, _POS, _NEG, _ZERO = range(9)
_INT_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# dtypes whose min/max we read exactly as int64 (float64 would round int64 beyond 2**53);
# uint16..64 lack aminmax and go through float64 like the rest
_EXACT_MINMAX = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                           torch.int64})
# dtypes torch.take does not support: we sample their bits through an int dtype of equal size
_TAKE_BY_BITS = frozenset({torch.uint16, torch.uint32, torch.uint64, torch.complex32,
                           *(d for d in vars(torch).values()
                             if isinstance(d, torch.dtype) and str(d).startswith("torch.float8"))})


@dataclass(frozen=True, kw_only=True)
class TensorStats:
    """What a tensor holds, in numbers. ``None`` means "not computed"; ``note`` says why.

    ``min``/``max``/``mean``/``std`` are over finite values only (``std`` with Bessel's
    correction, like ``torch.std``); complex tensors are summarised by their magnitude ``|z|``
    and sparse tensors count their implicit zeros. ``hist`` is a histogram of a sample of the
    finite values between ``min`` and ``max`` (``HIST_BINS`` bins), for sparklines.

    >>> s = tensor_stats(torch.tensor([1.0, 2.0, float("nan"), 0.0]))
    >>> (s.numel, s.nan, s.zeros, s.min, s.max, s.mean)
    (4, 1, 1, 0.0, 2.0, 1.0)
    """

    numel: int | None = None
    nan: int | None = None
    posinf: int | None = None
    neginf: int | None = None
    zeros: int | None = None
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    note: str = ""
    hist: tuple[int, ...] = ()
    local: bool = False  # a DTensor: the numbers are of this rank's shard, not the whole

    @property
    def finite(self) -> int | None:
        """How many values are neither NaN nor ±Inf (None when the counts were not computed).

        >>> tensor_stats(torch.tensor([1.0, float("inf"), float("nan")])).finite
        1
        """
        numel, nan, posinf, neginf = self.numel, self.nan, self.posinf, self.neginf
        if numel is None or nan is None or posinf is None or neginf is None:
            return None
        return numel - nan - posinf - neginf


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """Count, range, mean, std, NaN/Inf/zero counts and a histogram of ``t``; never raises.

    >>> s = tensor_stats(torch.arange(6).reshape(2, 3))
    >>> (s.min, s.max, s.mean, round(s.std, 4))
    (0, 5, 2.5, 1.8708)
    >>> tensor_stats(torch.empty(2, 3, device="meta")).note
    'meta tensor: no data'
    """
    if not isinstance(t, torch.Tensor):
        return TensorStats(note=f"not a tensor ({type(t).__name__})")
    with unobserved():
        if is_dtensor(t):
            # the global values live on every rank: reading them is a collective that would
            # block forever when only this rank describes the tensor. The local shard is ours.
            stats = call_without_grad(_stats, local_shard(t))
            return dataclasses.replace(stats, local=True)
        return call_without_grad(_stats, t)


def _stats(t: torch.Tensor) -> TensorStats:
    """``tensor_stats`` itself, run with autograd off and modes hidden."""
    try:
        numel = t.numel()
    except Exception as err:  # e.g. tensor subclasses with symbolic sizes
        return TensorStats(note=f"size unknown: {type(err).__name__}: {err}")
    no_data = _why_no_data(t)
    if no_data:
        return TensorStats(numel=numel, note=no_data)
    if numel == 0:
        return TensorStats(numel=0, nan=0, posinf=0, neginf=0, zeros=0, note="empty")
    try:
        return _compute(t.detach(), numel)
    except Exception as err:  # the contract is "never raises": say what failed instead
        return TensorStats(numel=numel, note=f"stats failed: {type(err).__name__}: {err}")


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Hide our reductions from active torch-function / dispatch modes (a shape tracer, a NaN
    watcher, a FLOP counter, FakeTensorMode): describing a tensor is not part of the model."""
    from torch.utils._python_dispatch import _disable_current_modes

    with torch._C.DisableTorchFunction(), _disable_current_modes():
        yield


def is_fake(t: torch.Tensor) -> bool:
    """True for a FakeTensor. Fake tensors exist only once their module is imported, and
    importing it ourselves would pull in sympy (seconds) on the first ``describe``."""
    fake_tensor = sys.modules.get("torch._subclasses.fake_tensor")
    return fake_tensor is not None and isinstance(t, fake_tensor.FakeTensor)


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor (every FSDP2 parameter, tensor parallel). Checked through
    ``sys.modules``: importing torch.distributed ourselves would cost time on every describe.

    >>> is_dtensor(torch.ones(2))
    False
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: a DTensor's local shard (reading the global tensor would
    start a collective that the other ranks are not in); any other tensor as it is. Read as
    the DTensor's own attribute: no collective, no autograd edge, cheap enough for hooks.

    >>> local_shard(torch.ones(2)).shape
    torch.Size([2])
    """
    shard = getattr(t, "_local_tensor", None)  # DTensor (FSDP2 parameters, tensor parallel)
    return shard if isinstance(shard, torch.Tensor) else t


def padded_shape(t: torch.Tensor) -> torch.Size:
    """A tensor's shape; a strided nested tensor's (whose ragged axes have no size, as
    ``nn.TransformerEncoder`` makes from a padding mask in eval) is its padded one, each axis as
    long as its longest component, as ``to_padded_tensor`` makes it. A jagged one has a shape.

    >>> padded_shape(torch.ones(2, 3, 2))  # a nested one of (3, 2) and (1, 2) gives the same
    torch.Size([2, 3, 2])
    """
    if not t.is_nested or t.layout == torch.jagged:
        return t.shape
    sizes = t._nested_tensor_size()  # (components, axes of one component)
    return torch.Size([sizes.shape[0], *sizes.amax(dim=0).tolist()])


def _why_no_data(t: torch.Tensor) -> str:
    if t.is_meta:
        return "meta tensor: no data"
    if is_fake(t):
        return "fake tensor: no data"
    if t.is_nested:
        return ""
    if t.layout not in (torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_csc,
                        torch.sparse_bsr, torch.sparse_bsc):
        return f"layout {t.layout}: no statistics"
    return ""


def _compute(t: torch.Tensor, numel: int) -> TensorStats:
    if t.is_nested:  # rare and small: the components' values, concatenated
        t = torch.cat([c.reshape(-1) for c in t.unbind()])
    if t.is_quantized:
        t = t.dequantize()
    implicit_zeros = 0
    if t.layout != torch.strided:
        values = t.coalesce().values() if t.layout == torch.sparse_coo else t.values()
        implicit_zeros = numel - values.numel()
        t = values
    wide = _wide(t.device)
    exact_minmax = t.dtype in _EXACT_MINMAX and wide == torch.float64
    parts = _partials(t) if t.numel() else torch.zeros(0, 9, dtype=wide, device=t.device)
    if implicit_zeros:
        # built by fills, not torch.tensor([...]): a host-to-device copy would sync
        zero_part = torch.zeros(1, 9, dtype=wide, device=t.device)
        zero_part[0, _N] = zero_part[0, _ZERO] = implicit_zeros
        parts = torch.cat([parts, zero_part])
    total = _merge(parts)
    hist = _histogram(t, total[_MIN], total[_MAX])
    if implicit_zeros:  # the sample saw stored values only: add the zeros, scaled alike
        zero_bin = _histogram(torch.zeros(1, device=t.device), total[_MIN], total[_MAX])
        hist = hist + zero_bin * implicit_zeros * min(1.0, _SAMPLE / max(t.numel(), 1))
    pieces = [total, hist.round()]
    if exact_minmax and t.numel():
        lo, hi = torch.aminmax(t)
        exact = torch.stack([lo, hi]).to(torch.int64)
        if implicit_zeros:
            exact = torch.stack([exact[0].clamp(max=0), exact[1].clamp(min=0)])
        pieces.append(exact.view(torch.float64))  # bit-cast: int64 beyond 2**53 stays exact
    host = torch.cat(pieces).tolist()  # the one host read
    return _to_stats(host, numel, exact_minmax and t.numel() > 0, t.dtype.is_complex)


def _to_stats(host: list[float], numel: int, exact: bool, is_complex: bool) -> TensorStats:
    n = int(host[_N])
    counts = TensorStats(numel=numel, nan=int(host[_NAN]), posinf=int(host[_POS]),
                         neginf=int(host[_NEG]), zeros=int(host[_ZERO]))
    hist = tuple(int(c) for c in host[9:9 + HIST_BINS])
    note = "stats of |z|" if is_complex else ""
    if n == 0:
        return dataclasses.replace(counts, note=note or "no finite values")
    lo: float = host[_MIN]
    hi: float = host[_MAX]
    if exact:
        lo, hi = struct.unpack("<2q", struct.pack("<2d", *host[9 + HIST_BINS:]))
    std = math.sqrt(max(host[_M2], 0.0) / (n - 1)) if n > 1 else None
    return dataclasses.replace(counts, min=lo, max=hi, mean=host[_MEAN], std=std, note=note,
                               hist=hist)


def _wide(device: torch.device) -> torch.dtype:
    """The accumulation dtype: float64, except on Apple's MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _partials(t: torch.Tensor) -> torch.Tensor:
    """Partial moments, one row per chunk, shape (k, 9), float64 (MPS: float32), on ``t``'s
    device."""
    if t.dtype in (torch.float32, torch.float64):
        if t.device.type != "cpu":
            size = _device_chunk(t.device)
            return torch.stack([_partial_direct(c) for c in _chunks(_memory_order(t), size)])
        row = _partial_cpu(t)
        if row is not None:
            return row[None]
    # Chunk by chunk through one reusable scratch buffer: no full-size temporaries, and no
    # fresh allocation per chunk (on CPU every large allocation costs page faults).
    size = _CHUNK if t.device.type == "cpu" else _device_chunk(t.device)
    # float64: exact for ints up to 2**53, no overflow of squares, accurate long sums
    buf = torch.empty(min(t.numel(), size), device=t.device, dtype=_wide(t.device))
    can_be_nonfinite = t.dtype.is_floating_point or t.dtype.is_complex
    rows = []
    for chunk in _chunks(_memory_order(t), size):
        b = buf[: chunk.numel()].view(chunk.shape)
        b.copy_(chunk.abs() if chunk.dtype.is_complex else chunk)
        rows.append(_partial_in_place(b, can_be_nonfinite))
    return torch.stack(rows)


def _partial_cpu(x: torch.Tensor) -> torch.Tensor | None:
    """Moments of a float32/64 CPU tensor in single passes with no temporaries, or None.

    On CPU reading a number costs no device sync, so we look before we leap: ``aminmax``
    tells whether the tensor holds NaN/Inf; if not, ``sum`` and ``vector_norm`` give the
    moments (one vectorised pass each, unlike ``var_mean``'s slow Welford loop). NaN/Inf, or a
    variance that the sum of squares cannot resolve (|mean| >> std), return None: the caller
    then takes the exact chunked path.
    """
    x = _memory_order(x)
    if not x.is_contiguous():
        return None
    lo, hi = (v.item() for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    n = x.numel()
    mean = x.sum().item() / n  # torch's CPU sum is pairwise: accurate in float32
    # vector_norm over a whole float32 tensor drifts (~1e-3 on 40M values); over rows of
    # 4096 it stays accurate, and the row results are summed in float64
    flat = x.view(-1)
    k = n // _ROW * _ROW
    sumsq = 0.0
    # never view an empty slice as rows: `view(-1, _ROW)` of 0 elements has no defined row
    # count, and some tensor subclasses (DTensor) search for one forever
    if k:
        rows = flat[:k].view(k // _ROW, _ROW)
        sumsq += torch.linalg.vector_norm(rows, dim=1).double().square().sum().item()
    if k < n:
        sumsq += torch.linalg.vector_norm(flat[k:]).double().item() ** 2
    m2 = sumsq - n * mean * mean
    if not math.isfinite(sumsq) or m2 <= 1e-2 * n * mean * mean:
        return None
    # a range that excludes 0 holds no zeros: skip the counting pass
    zeros = n - torch.count_nonzero(x).item() if lo <= 0 <= hi else 0
    return torch.tensor([n, mean, m2, lo, hi, 0, 0, 0, zeros], dtype=torch.float64)


def _partial_direct(c: torch.Tensor) -> torch.Tensor:
    """Moments of a float32/64 chunk on an accelerator, read where it lies: no wide copy, and
    each pass one elementwise kernel plus one reduction that accumulates in the wide dtype."""
    wide = _wide(c.device)
    finite = torch.isfinite(c)
    n = finite.sum(dtype=wide)
    nan = torch.isnan(c).sum(dtype=wide)
    posinf = (c == math.inf).sum(dtype=wide)
    zeros = (c == 0).sum(dtype=wide)
    lo = torch.where(finite, c, math.inf).amin()
    hi = torch.where(finite, c, -math.inf).amax()
    pivot = torch.where(n > 0, lo, 0.0)
    # shifting by a data value (the minimum) keeps the sum of squares from cancelling;
    # NaN/Inf become exactly 0 after the shift: no weight in the sums
    d = torch.where(finite, c - pivot, 0.0)
    s1, s2 = d.sum(dtype=wide), d.square().sum(dtype=wide)
    return _row(wide, n, pivot, s1, s2, lo, hi, nan, posinf, c.numel() - n - nan - posinf, zeros)


def _device_chunk(device: torch.device) -> int:
    """Elements per chunk on an accelerator. Each chunk costs some 30 kernel launches, and on
    CUDA the launches, not the bytes, set the time (H100, a 50257x768 float32 tensor: 10.9 ms in
    chunks of 2**22, 3.5 ms in one of 2**26), so chunks are as large as keeps our scratch
    memory near 1% of the card's."""
    if device.type != "cuda":
        return _DEVICE_CHUNK
    total = torch.cuda.get_device_properties(device).total_memory
    return max(_DEVICE_CHUNK, min(_MAX_DEVICE_CHUNK, 1 << int(math.log2(total // 1024))))


def _partial_in_place(b: torch.Tensor, can_be_nonfinite: bool) -> torch.Tensor:
    """Moments over the finite values of ``b``, a float scratch buffer that we overwrite."""
    total = b.numel()
    zeros = total - torch.count_nonzero(b)  # NaN and Inf count as non-zero, rightly
    lo = hi = None
    if can_be_nonfinite and b.device.type == "cpu":
        # on CPU a look costs no sync, and most chunks are finite: skip the slow mask passes
        lo, hi = torch.aminmax(b)
        can_be_nonfinite = not (math.isfinite(lo.item()) and math.isfinite(hi.item()))
    if can_be_nonfinite:
        bad = ~torch.isfinite(b)
        n = total - bad.sum()
        nan = torch.isnan(b).sum()
        posinf = (b == math.inf).sum()
        neginf = total - n - nan - posinf
        lo = b.masked_fill_(bad, math.inf).amin()
        hi = b.masked_fill_(bad, -math.inf).amax()
        pivot = torch.where(n > 0, lo, 0.0)
        # NaN/Inf slots become exactly 0 after the shift: no weight in the sums. (A scalar
        # fill: masked_fill_ with a tensor value reads it on the host, a sync on CUDA.)
        b.sub_(pivot).masked_fill_(bad, 0.0)
    else:
        n = torch.full((), total, dtype=torch.int64, device=b.device)
        nan = posinf = neginf = torch.zeros((), dtype=torch.int64, device=b.device)
        if lo is None or hi is None:
            lo, hi = torch.aminmax(b)
        pivot = lo
        b.sub_(pivot)
    # shifting by a data value (the minimum) keeps the sum of squares from cancelling
    s1, s2 = b.sum(), torch.linalg.vector_norm(b).square()
    return _row(b.dtype, n, pivot, s1, s2, lo, hi, nan, posinf, neginf, zeros)


def _row(wide: torch.dtype, n: torch.Tensor, pivot: torch.Tensor, s1: torch.Tensor,
         s2: torch.Tensor, *extremes_and_counts: torch.Tensor) -> torch.Tensor:
    """One row of partial moments (``_N`` .. ``_ZERO``) from the sums of the values shifted
    by ``pivot``: ``s1`` of ``x - pivot``, ``s2`` of its squares. ``extremes_and_counts``:
    min, max, and the NaN, +Inf, -Inf and zero counts. (``.to`` of a tensor already in
    ``wide`` is free: no kernel.)"""
    n = n.to(wide)
    count = n.clamp(min=1)
    m2 = (s2 - s1 * s1 / count).clamp(min=0)
    return torch.stack([n, pivot.to(wide) + s1 / count, m2,
                        *(v.to(wide) for v in extremes_and_counts)])


def _merge(parts: torch.Tensor) -> torch.Tensor:
    """Combine per-chunk moments into one row (Chan et al.), all on device."""
    n_i, mean_i = parts[:, _N], parts[:, _MEAN]
    n = n_i.sum()
    mean = (n_i * mean_i).sum() / n.clamp(min=1)
    m2 = parts[:, _M2].sum() + (n_i * (mean_i - mean).square()).sum()
    # a chunk without finite values has a meaningless min/max: keep it out of the range
    has = n_i > 0
    lo = torch.where(has, parts[:, _MIN], math.inf).amin()
    hi = torch.where(has, parts[:, _MAX], -math.inf).amax()
    counts = parts[:, _NAN:].sum(0)
    return torch.cat([torch.stack([n, mean, m2, lo, hi]), counts])


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its axes permuted outermost-in-memory first (statistics ignore axis order):
    chunks of a transposed tensor then read memory in order instead of one element per line."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride()[d])
    return t.permute(order)


def _chunks(t: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Views of ``t`` with at most ``size`` elements each (splitting leading axes; no copies)."""
    if t.numel() <= size or t.dim() == 0:
        yield t
        return
    row = t[0].numel() if t.shape[0] else 0
    if row >= size:
        for sub in t:
            yield from _chunks(sub, size)
        return
    yield from t.split(max(1, size // max(row, 1)), dim=0)


def _histogram(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``HIST_BINS`` counts of a fixed sample of ``t``'s finite values in [lo, hi]."""
    n = t.numel()
    if n == 0:
        return torch.zeros(HIST_BINS, dtype=lo.dtype, device=t.device)
    index = torch.arange(min(n, _SAMPLE), device=t.device)
    if n > _SAMPLE:
        # a golden-ratio stride spreads the sample over the whole tensor without RNG state or a
        # host-to-device copy, and does not alias with row lengths the way a plain stride does
        index = (index * (int(n * 0.6180339887) | 1)) % n
    sample = take(t, index)
    sample = sample.abs() if sample.dtype.is_complex else sample
    sample = sample.to(lo.dtype)
    span = hi - lo
    scaled = torch.where(span > 0, (sample - lo) / span, 0.5) * HIST_BINS
    bins = scaled.nan_to_num(nan=-1.0).floor().clamp(max=HIST_BINS - 1)
    bins = torch.where(torch.isfinite(sample), bins, -1)  # drop NaN/±Inf samples
    # compare-and-sum instead of bincount: deterministic on CUDA too
    edges = torch.arange(HIST_BINS, device=t.device, dtype=lo.dtype)
    return (bins[:, None] == edges).sum(0).to(lo.dtype)


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch.take`` (row-major element indices, any strides) for every dtype: the dtypes it
    lacks (uint16..64, fp8, complex32) go through an int dtype of the same size.

    >>> take(torch.arange(6).to(torch.uint16).reshape(2, 3).t(), torch.tensor([1, 2]))
    tensor([3, 1], dtype=torch.uint16)
    """
    if t.dtype in _TAKE_BY_BITS:
        bits = _INT_BITS[t.dtype.itemsize]
        return torch.take(t.view(bits), index).view(t.dtype)
    return torch.take(t, index)

"""How close is close enough: tolerances that follow the dtype, and a measure of one difference.

Two tiers per dtype. Below the *strict* tier (``torch.testing``'s own defaults) two tensors are
the same computation; between it and the *default* tier they *drift* (a legal reformulation:
tanh-GELU against erf-GELU is ~1e-3, a fused kernel sums in another order); beyond the default
tier they *differ*: a bug, such as a missing ``1 / sqrt(hs)``. Attention masks are written
with ``-inf`` or with the dtype's lowest number (Hugging Face): at or beyond half the dtype's
range on the same side, two numbers count as equal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# dtype -> (rtol, atol): strict as torch.testing.assert_close, default loose enough for drift
_STRICT = {
    torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7),
}
_DEFAULT = {
    torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2),
    torch.float32: (1e-2, 1e-2), torch.float64: (1e-6, 1e-6),
}


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """``|a - b| <= atol + rtol * |b|`` elementwise; None fields follow the dtype.

    >>> Tolerance().limits(torch.float32)
    (0.01, 0.01)
    >>> Tolerance(rtol=0.0, atol=1e-6).limits(torch.float16)
    (0.0, 1e-06)
    """

    rtol: float | None = None
    atol: float | None = None

    def limits(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(rtol, atol)`` for tensors of ``dtype`` (the user's values first)."""
        rtol, atol = _DEFAULT.get(dtype, (0.0, 0.0))  # integers and booleans: exact
        return (rtol if self.rtol is None else self.rtol, atol if self.atol is None else self.atol)


def strict_limits(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` below which two tensors hold the same numbers (``torch.testing``'s)."""
    return _STRICT.get(dtype, (0.0, 0.0))


@dataclass(frozen=True, kw_only=True)
class TensorDiff:
    """How one tensor differs from its reference.

    >>> d = measure(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), Tolerance())
    >>> d.status, d.max_abs, d.worst_index
    ('differs', 0.5, (1,))
    """

    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    max_abs: float  # inf when the shapes differ
    max_rel: float
    worst_index: tuple[int, ...] | None  # where |a - b| is largest
    status: str  # "same", "drift", "differs" or "shape"

    @property
    def differs(self) -> bool:
        """Beyond the tolerance, or not even the same shape."""
        return self.status in ("differs", "shape")


def core_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without its leading 1s: what broadcasting sees.

    >>> core_shape((1, 6, 32))
    (6, 32)
    """
    start = 0
    while start < len(shape) and shape[start] == 1:
        start += 1
    return shape[start:]


def _with_shapes(diff: TensorDiff, shape: tuple[int, ...], reference_shape: tuple[int, ...]
                 ) -> TensorDiff:
    return dataclasses.replace(diff, shape=shape, reference_shape=reference_shape,
                               worst_index=None)


def measure(value: torch.Tensor, reference: torch.Tensor, tolerance: Tolerance) -> TensorDiff:
    """Compare ``value`` with ``reference`` elementwise (see :class:`TensorDiff`)."""
    shape, ref_shape = tuple(value.shape), tuple(reference.shape)
    core, ref_core = core_shape(shape), core_shape(ref_shape)
    if shape != ref_shape and core == ref_core:  # (T, C) against (1, T, C):
        value, reference = value.reshape(core), reference.reshape(ref_core)
        return _with_shapes(measure(value, reference, tolerance), shape, ref_shape)  # broadcast
    if shape != ref_shape:
        return TensorDiff(shape=shape, reference_shape=ref_shape, max_abs=float("inf"),
                          max_rel=float("inf"), worst_index=None, status="shape")
    if value.numel() == 0 or (value.dtype == reference.dtype and value.device == reference.device
                              and torch.equal(value, reference)):  # the common case, one pass
        return TensorDiff(shape=shape, reference_shape=ref_shape, max_abs=0.0, max_rel=0.0,
                          worst_index=None, status="same")
    # float32 at least (bool/int/half inputs), on the tensors' own device: only scalars travel
    dtype = torch.promote_types(torch.promote_types(value.dtype, reference.dtype), torch.float32)
    a = value.detach().to(dtype)
    b = reference.detach().to(a.device, dtype)
    both_nan = a.isnan() & b.isnan()
    # a mask written as -inf or as the dtype's lowest number (Hugging Face's) is the same mask
    huge = torch.finfo(value.dtype if value.is_floating_point() else dtype).max / 2
    masked = ((a <= -huge) & (b <= -huge)) | ((a >= huge) & (b >= huge))
    error = (a - b).abs().masked_fill(both_nan | masked, 0.0)  # inf == inf is no error
    error = error.nan_to_num(nan=float("inf"))
    worst = int(error.argmax())
    max_abs = float(error.flatten()[worst])
    rel = error / b.abs().clamp_min(torch.finfo(dtype).tiny)
    max_rel = float(rel.masked_fill(error == 0, 0.0).max())
    rtol, atol = tolerance.limits(value.dtype)
    strict_rtol, strict_atol = strict_limits(value.dtype)
    bound = b.abs().nan_to_num(posinf=0.0)
    if bool((error > atol + rtol * bound).any()):
        status = "differs"
    elif bool((error > strict_atol + strict_rtol * bound).any()):
        status = "drift"
    else:
        status = "same"
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), shape)) if shape else ()
    return TensorDiff(shape=shape, reference_shape=ref_shape, max_abs=max_abs, max_rel=max_rel,
                      worst_index=index, status=status)

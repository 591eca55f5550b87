"""The cheap tier's question, "is everything this step made finite?", in a few ops per step.

Each watched tensor (a module output, a gradient) is reduced to its largest magnitude,
``|x|.max()``: NaN when it holds a NaN, inf when it holds an Inf, and otherwise one of its own
finite values. That reduction is exact: a sum, by contrast, overflows (a float32 attention mask
filled with ``-finfo.max`` sums to ``-inf``) and would report non-finite values where there are
none. The model's inputs are reduced to their maximum instead, whose sign tells an additive mask
that holds ``-inf`` on purpose (max ``-inf`` or finite) from a real ``+inf`` or NaN.

On CPU the largest magnitude (``vector_norm(x, inf)``) runs ~10x slower than a sum or a 2-norm
(torch 2.x: ~120 ms for GPT-2's 50257 x 768 embedding gradient, 6% of a training step), so CPU
tensors are screened first with the 2-norm, finite exactly when every element is (a NaN or an
Inf in ``x`` makes it NaN or Inf), and only the tensors it flags get the exact reduction: a
2-norm of large finite values may overflow, and must not raise a false alarm.

The reductions are batched: one multi-tensor ``torch._foreach_norm(tensors, inf)`` (one kernel
launch per batch on a GPU, not one per tensor) over everything pending, and one host read of all
results at the end of the phase. A pending tensor is held until its batch is reduced, which can
keep alive a tensor the step would have freed (an output only added to the residual stream, or
any output without autograd); so a batch is reduced as soon as the pending bytes pass a budget
that keeps the extra memory a small fraction of the step's.

>>> batch = Batch(budget=1 << 20)
>>> batch.add("h.0", torch.tensor([1.0, -3.0]))
>>> batch.add("h.1", torch.tensor([-torch.finfo(torch.float32).max, float("nan")]))
>>> [(r.label, r.kind) for r in batch.read()]
[('h.0', None), ('h.1', 'nan')]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy

from torchlens_edu._core.interrupts import call_without_grad
from torchlens_edu.nans.report import Kind
from torchlens_edu.nans.shards import has_values
from torchlens_edu.printing.stats import local_shard

__all__ = ["Batch", "Reading", "checkable", "memory_budget", "unseen"]

Owner = TypeVar("Owner")

# the floor of the pending-memory budget: below it, batching saves more ops than it costs memory
_MIN_BUDGET = 1 << 20


@contextmanager
def unseen() -> Iterator[None]:
    """A block whose torch calls no ``TorchFunctionMode`` sees: the watch's own checks and hook
    registrations are not the user's ops (an op trace around the watch must not list them).

    >>> with unseen():
    ...     _ = torch.ones(1) + 1
    """
    with torch._C.DisableTorchFunction():
        yield


def memory_budget(model: nn.Module) -> int:
    """Bytes of pending tensors a :class:`Batch` may hold for ``model``: 5% of its parameter and
    buffer bytes (a step holds at least those, so the watch adds at most ~5% memory), and 1 MiB
    at least.

    >>> memory_budget(torch.nn.Linear(2, 2))
    1048576
    """
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
               if not is_lazy(t))  # a lazy module's are sized by its first forward
    return max(size // 20, _MIN_BUDGET)


def checkable(t: torch.Tensor) -> bool:
    """A dense float tensor with values to read on this rank (see :func:`has_values`)."""
    t = local_shard(t)
    return ((t.is_floating_point() or t.is_complex()) and t.layout == torch.strided
            and t.numel() > 0 and has_values(t))


@dataclass(frozen=True, kw_only=True)
class Reading(Generic[Owner]):
    """One entry's reduction: ``value`` is NaN or +-inf when the tensor held one (NaN first),
    else a finite number (its largest magnitude, or on CPU maybe its 2-norm)."""

    label: str
    value: float
    signed: bool  # the maximum (a model input), not the largest magnitude
    owner: Owner | None

    @property
    def kind(self) -> Kind | None:
        """``"nan"``, ``"+inf"``, ``"-inf"``, ``"inf"`` (an Inf of either sign), None if finite."""
        if math.isnan(self.value):
            return "nan"
        if not math.isinf(self.value):
            return None
        if self.signed:
            return "+inf" if self.value > 0 else "-inf"
        return "inf"


@dataclass(eq=False, kw_only=True)
class _Pending:
    """Tensors waiting for their batch's reduction, grouped by device and reduction."""

    tensors: dict[tuple[torch.device, bool], list[torch.Tensor]] = field(
        default_factory=lambda: defaultdict(list))
    indices: dict[tuple[torch.device, bool], list[int]] = field(
        default_factory=lambda: defaultdict(list))
    bytes: int = 0


def _screened_magnitudes(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """For CPU tensors: a finite 2-norm where every element is finite, else the exact largest
    magnitude (NaN or inf, or finite where only the 2-norm overflowed). See the module doc.

    >>> big = torch.full((4,), torch.finfo(torch.float32).max)
    >>> [v.item() for v in _screened_magnitudes([torch.ones(4), big, torch.tensor([-math.inf])])]
    [2.0, 3.4028234663852886e+38, inf]
    """
    # summed in float32: half precision's squares overflow past 256 (65504 is fp16's max);
    # float64 cannot be narrowed to it, and keeps its own precision
    wide = any(t.dtype == torch.float64 for t in tensors)
    norms = list(torch._foreach_norm(tensors, 2, dtype=None if wide else torch.float32))
    flagged = [i for i, n in enumerate(torch.stack(norms).tolist()) if not math.isfinite(n)]
    if flagged:  # on CPU this read costs no synchronisation
        exact = torch._foreach_norm([tensors[i] for i in flagged], math.inf)
        for i, value in zip(flagged, exact, strict=True):
            norms[i] = value
    return tuple(norms)


class Batch(Generic[Owner]):
    """Labelled tensors of one phase (a forward or a backward), reduced in few ops, read once.

    ``add(label, t, owner=..., signed=...)``: ``signed`` reduces to the maximum (model inputs)
    instead of the largest magnitude; ``owner`` is whatever the caller needs back for an entry
    (the step a gradient belongs to). ``read()`` reduces what is pending and returns one float
    per entry, in the order added; the batch is then empty.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.labels: list[str] = []
        self.owners: list[Owner | None] = []
        self.signed: list[bool] = []
        self._pending = _Pending()
        self._results: list[tuple[list[int], tuple[torch.Tensor, ...]]] = []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, label: str, t: torch.Tensor, owner: Owner | None = None, *,
            signed: bool = False) -> None:
        with unseen():
            self._add(label, t, owner, signed)

    def _add(self, label: str, t: torch.Tensor, owner: Owner | None, signed: bool) -> None:
        t = local_shard(t)  # a DTensor's own shard: checks never start a collective
        if t.is_nested:  # nn.TransformerEncoder's padding fast path: the components' values
            t = t.values()
        if t.is_complex():
            t = torch.view_as_real(t.detach())  # |a + bi| could overflow where a, b do not
        size = t.numel() * t.element_size()
        if self._pending.bytes + size > self.budget:
            self.reduce()  # the pending ones first: with t, never more than the budget
        key = (t.device, signed)
        self._pending.tensors[key].append(t)
        self._pending.indices[key].append(len(self.labels))
        self.labels.append(label)
        self.owners.append(owner)
        self.signed.append(signed)
        self._pending.bytes += size
        if self._pending.bytes > self.budget:
            self.reduce()  # t alone is over the budget

    def reduce(self) -> None:
        """Reduce what is pending (one op per device and kind) and let go of the tensors."""
        pending, self._pending = self._pending, _Pending()
        if not pending.tensors:
            return
        for (device, signed), tensors in pending.tensors.items():
            # no graph (a ``detach`` per tensor would be an op each), unseen by op traces; not
            # ``torch.no_grad()``: a Ctrl-C at the first line of its __exit__ left grad mode off
            with unseen():
                if signed:
                    results = call_without_grad(torch._foreach_max, tensors)
                elif device.type == "cpu":
                    results = call_without_grad(_screened_magnitudes, tensors)
                else:  # one fused kernel on a GPU, read with the rest at the end of the phase
                    results = call_without_grad(torch._foreach_norm, tensors, math.inf)
            self._results.append((pending.indices[(device, signed)], results))

    def read(self) -> list[Reading[Owner]]:
        """Every entry's reduction, in the order added (one host read per device); the batch
        is empty after."""
        self.reduce()
        values = [0.0] * len(self.labels)
        by_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
        for indices, results in self._results:
            where, found = by_device.setdefault(results[0].device, ([], []))
            where.extend(indices)
            found.extend(results)
        for where, found in by_device.values():
            with unseen():
                stacked = torch.stack(found).tolist()
            for i, value in zip(where, stacked, strict=True):
                values[i] = value
        readings = [Reading(label=label, value=value, signed=signed, owner=owner)
                    for label, value, signed, owner in zip(
                        self.labels, values, self.signed, self.owners, strict=True)]
        self.clear()
        return readings

    def clear(self) -> None:
        """Forget everything (a step that failed midway)."""
        self.labels, self.owners, self.signed = [], [], []
        self._pending, self._results = _Pending(), []

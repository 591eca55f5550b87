"""What a forward that the toolkit runs itself may change, put back afterwards.

A forward writes state: BatchNorm's running statistics and ``num_batches_tracked`` in train
mode, spectral norm's power-iteration vector, a KV cache or step counter kept in a buffer or a
plain attribute (``self.steps += 1``, ``self.cache = torch.cat([self.cache, k])``), dropout's
draw from the random stream. When the user runs the forward (inside ``hooks``, ``capture``,
``watch_nans``) that is their step. When the toolkit runs one (a trace, a summary, a NaN
replay, a comparison) it is not, so :func:`kept_state` puts every module's buffers back (the
same tensor objects, with the same bits), its data attributes (numbers, strings, tensors:
rebound ones are bound back, added ones removed), and the random state.

>>> import torch.nn as nn

from torchlens_edu._core.interrupts import safe_contextmanager
from torchlens_edu._core.tree import iter_tensors
>>> bn = nn.BatchNorm1d(2).train()
>>> with kept_state(bn):
...     _ = bn(torch.randn(4, 2))
>>> int(bn.num_batches_tracked)
0
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from torchlens_edu._core.interrupts import safe_contextmanager
from torchlens_edu._core.tree import iter_tensors

Rng = tuple[torch.Tensor, list[torch.Tensor] | None]
# what a forward's own state is made of; anything else in a module's ``__dict__`` (FSDP's
# state, a framework's handles set up lazily on the first call) is not the toolkit's to undo
_DATA = (bool, int, float, complex, str, type(None), torch.Tensor)


def _is_data(value: object) -> bool:
    return isinstance(value, _DATA) and not isinstance(value, nn.Parameter)


def save_rng() -> Rng:
    """The CPU and (when in use) CUDA random states.

    >>> cpu, _ = save_rng()
    >>> cpu.dtype
    torch.uint8
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng(state: Rng) -> None:
    """Put back random states from :func:`save_rng`.

    >>> state = save_rng(); _ = torch.rand(1); set_rng(state)
    """
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _saved(value: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """A tensor (a DTensor's local shard: comparing the global one would start a collective),
    its version counter, and a copy of its bits to write back (None where there are none:
    meta, nested, sparse)."""
    local = getattr(value, "_local_tensor", None)
    value = local if isinstance(local, torch.Tensor) else value
    if value.is_meta or value.is_nested or value.layout != torch.strided:
        return value, value._version, None
    with torch.no_grad():
        return value, value._version, value.detach().clone()


def _changed(tensor: torch.Tensor, version: int, bits: torch.Tensor) -> bool:
    # the counter alone misses BatchNorm's running statistics: its kernel writes them in place
    # without a bump
    return tensor._version != version or not torch.equal(tensor, bits)


class _Snapshot:
    """Every module's buffer table and data attributes (numbers, strings, tensors); a copy of
    the bits of its buffers and tensor attributes (not of its parameters: a forward does not
    write them, and a meta trace of a large model must not copy its weights)."""

    def __init__(self, models: tuple[nn.Module, ...], bits: bool) -> None:
        self.modules = list({id(m): m for model in models for m in model.modules()}.values())
        self.attributes = [dict(m.__dict__) for m in self.modules]
        self.buffers = [dict(m._buffers) for m in self.modules]
        state = {id(t): t for m in self.modules
                 for t in (*m._buffers.values(), *m.__dict__.values())
                 if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)}
        self.bits = [_saved(t) for t in state.values()] if bits else []
        self.rng = save_rng()

    def restore(self) -> None:
        for module, attributes, buffers in zip(self.modules, self.attributes, self.buffers,
                                               strict=True):
            module._buffers.clear()  # ``self.cache = torch.cat([self.cache, k])`` rebinds one
            module._buffers.update(buffers)
            now = module.__dict__
            for name in [n for n, value in now.items() if n not in attributes and _is_data(value)]:
                del now[name]  # made by the forward (a mask cached on the first call)
            for name, value in attributes.items():
                if name in now and now[name] is not value and _is_data(value) \
                        and _is_data(now[name]):
                    now[name] = value  # rebound: ``self.steps += 1`` on an int
        with torch.no_grad():
            for tensor, version, bits in self.bits:
                if bits is not None and _changed(tensor, version, bits):
                    # through .data: no version bump. A graph the user built before saved
                    # these bits (BatchNorm's backward reads its running statistics); it gets
                    # them back, and its backward still runs
                    tensor.data.copy_(bits)
        set_rng(self.rng)


@safe_contextmanager  # a Ctrl-C never leaves the model half put back
def kept_state(*models: nn.Module, bits: bool = True) -> Iterator[None]:
    """Run the block, then put back what a forward of ``models`` changed in them (buffers,
    data attributes) and the random state (see the module's docstring). ``bits=False``
    for a meta run: its buffers are meta twins, the real ones are not written and not copied."""
    snapshot = _Snapshot(models, bits)
    try:
        yield
    finally:
        snapshot.restore()


def private_inputs(args: tuple, kwargs: dict[str, Any] | None = None
                   ) -> tuple[tuple, dict[str, Any]]:
    """A forward's arguments for a run of the toolkit's own: the tensors as they are, stateful
    objects (a KV cache the forward appends to, Hugging Face's ``DynamicCache``) copied, so
    that the run does not advance the user's.

    >>> cache = [torch.ones(1)]
    >>> args, _ = private_inputs((cache,))
    >>> args[0] is cache, args[0][0] is cache[0]
    (False, True)
    """
    kwargs = {} if kwargs is None else kwargs
    tensors = {id(t): t for t in iter_tensors((args, kwargs))}
    try:
        return copy.deepcopy((args, kwargs), memo=dict(tensors))
    except (TypeError, RuntimeError, copy.Error):
        # an object that cannot be copied (a lock, a graph tensor deep inside): the originals,
        # as the user's own call would have them
        return args, kwargs

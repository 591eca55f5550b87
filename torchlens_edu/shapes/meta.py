"""Shape-only runs: the model's parameters and the inputs become ``meta`` tensors.

A meta tensor has a shape and a dtype but no storage, so GPT-2 XL "runs" in a second on a laptop
and no weight is read, copied or allocated. The model itself is not changed: its parameters are
swapped for meta stand-ins only while the run lasts (as a ``with`` block, so that any code inside
it may call the model) and the same objects are put back afterwards; tied weights stay tied
because the stand-ins are made once per tensor.

A run that must stay invisible (``capture``'s memory estimate) uses :func:`meta_twin` instead:
a copy of the model, on meta, without any of the hooks on the original, run while
:func:`twin_running` is true, so that no observer (the user's hooks, a ``HookSet``, a shape
trace, a NaN watch) ever sees it.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import conv_flop_count

from torchlens_edu._core.tree import map_tensors

# Ops whose output shape depends on the values: they cannot run on meta tensors.
DATA_DEPENDENT = frozenset({
    "item", "tolist", "bool", "nonzero", "argwhere", "masked_select", "unique",
    "unique_consecutive", "[]", "[]=", "any", "all", "equal", "allclose", "repeat_interleave",
    "bincount", "histc", "where", "multinomial", "numpy",
})


def to_meta(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of the same shape, dtype and strides; reads no data."""
    if tensor.is_meta:
        return tensor
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def inputs_to_meta(args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(args, kwargs)`` with every tensor inside replaced by its meta twin."""
    with torch._C.DisableTorchFunction():  # our conversion is not one of the model's ops
        return map_tensors(to_meta, args), map_tensors(to_meta, kwargs)


def _twin(tensor: torch.Tensor) -> torch.Tensor:
    """The meta stand-in for one parameter or buffer: a ``Parameter`` stays a ``Parameter``."""
    twin = to_meta(tensor)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(twin, requires_grad=tensor.requires_grad)
    return twin


@contextmanager
def on_meta(model: nn.Module, twins: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """While the block runs, ``model``'s parameters and buffers are meta twins; then the very
    same objects are put back, also when the block raises.

    The swap works on each module's own ``_parameters``/``_buffers`` dicts, each module once
    however many paths reach it (a tied projection registered under two parents, shared
    encoder/decoder embeddings): swapping by name would swap a shared module twice and put
    the first twin back. One twin per tensor keeps tied weights tied; pass the same ``twins``
    dict to several calls to keep ties across models.

    >>> m = nn.Linear(2, 2)
    >>> weight = m.weight
    >>> with on_meta(m):
    ...     m.weight.is_meta
    True
    >>> m.weight is weight
    True
    """
    twins = {} if twins is None else twins
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = []  # (table, name, original)
    for module in model.modules():  # each module object once
        tables: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for table in tables:
            for name, tensor in table.items():
                if tensor is not None and not tensor.is_meta:
                    if id(tensor) not in twins:
                        twins[id(tensor)] = _twin(tensor)
                    slots.append((table, name, tensor))
    try:
        for table, name, tensor in slots:
            table[name] = twins[id(tensor)]
        yield
    finally:
        for table, name, tensor in slots:
            table[name] = tensor


_twin_runs = threading.local()  # .running: a meta twin runs in this thread


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters, buffers and tensor attributes are meta tensors and
    whose modules have no hooks: what it runs, nobody sees. Raises what ``copy.deepcopy`` raises
    for models that cannot be copied.

    >>> m = nn.Linear(2, 3)
    >>> _ = m.register_forward_hook(lambda *a: print("never printed"))
    >>> twin = meta_twin(m)
    >>> twin.weight.device, twin(torch.zeros(1, 2, device="meta")).shape
    (device(type='meta'), torch.Size([1, 3]))
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name.endswith(("_hooks", "_hooks_with_kwargs", "_hooks_always_called")) and \
                    isinstance(value, dict):
                memo[id(value)] = type(value)()  # hooks stay on the original
            elif isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = to_meta(value)  # e.g. a causal mask kept as a plain attribute
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and id(tensor) not in memo:  # once per tensor: ties stay
                memo[id(tensor)] = _twin(tensor)
    return copy.deepcopy(model, memo)


@contextmanager
def twin_running() -> Iterator[None]:
    """Marks a :func:`meta_twin` run in this thread: observers with global hooks ignore it.

    >>> with twin_running():
    ...     is_twin_running()
    True
    """
    before = getattr(_twin_runs, "running", False)
    _twin_runs.running = True
    try:
        yield
    finally:
        _twin_runs.running = before


def is_twin_running() -> bool:
    """True inside :func:`twin_running` (in this thread)."""
    return getattr(_twin_runs, "running", False)


def op_flops(name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
    """FLOPs of one op from its shapes, with torch's formulas (``torch.utils.flop_counter``).

    Counted at the level of the user's call (``linear``, ``@``, ``conv2d``, ``F.sdpa``), where
    ``FlopCounterMode`` would push every op through Python decompositions: 2-3x slower on meta.
    Like ``FlopCounterMode``, only matrix products, convolutions and attention count.

    >>> a, b = torch.ones(2, 3, device="meta"), torch.ones(3, 4, device="meta")
    >>> op_flops("@", [a, b], [a @ b])
    48
    """
    if not outputs or len(inputs) < 2:
        return 0
    out = outputs[0].shape
    if name == "linear":  # x (..., in) @ W.T (in, out)
        return 2 * math.prod(inputs[0].shape) * inputs[1].shape[0]
    if name in _PRODUCTS:
        a = inputs[1] if name in ("addmm", "baddbmm", "addmv") else inputs[0]
        return 2 * math.prod(out) * a.shape[-1]
    if name.startswith("conv") and len(inputs[1].shape) >= 3:
        return conv_flop_count(list(inputs[0].shape), list(inputs[1].shape), list(out),
                               transposed="transpose" in name)
    if name == "scaled_dot_product_attention" and len(inputs) >= 3:
        # torch's formula, q @ k^T then att @ v, written out: torch < 2.13's sdpa_flop_count
        # refuses grouped-query attention (fewer k/v heads, broadcast) and 3-D inputs
        q, k, v = (t.shape for t in inputs[:3])
        return 2 * math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])
    return 0


_PRODUCTS = frozenset({"@", "matmul", "mm", "bmm", "mv", "addmm", "baddbmm", "addmv"})


def output_bytes(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> int:
    """Bytes of new activation memory: outputs that are neither views nor one of the inputs."""
    seen = {id(t) for t in inputs}
    return sum(t.numel() * t.element_size() for t in outputs
               if id(t) not in seen and not t._is_view())

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

from torchlens_edu._core.modules import uses_fsdp
from torchlens_edu._core.tree import map_tensors
from torchlens_edu.printing.stats import is_dtensor

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
    """``(args, kwargs)`` with every tensor inside replaced by its meta twin, which requires
    grad where the tensor did (code such as a reentrant checkpoint behaves, and warns, by it)."""
    def twin(tensor: torch.Tensor) -> torch.Tensor:
        meta = to_meta(tensor)
        if tensor.requires_grad and meta is not tensor and (meta.is_floating_point()
                                                            or meta.is_complex()):
            meta.requires_grad_()
        return meta

    with torch._C.DisableTorchFunction():  # our conversion is not one of the model's ops
        return map_tensors(twin, args), map_tensors(twin, kwargs)


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


def sharding(model: nn.Module) -> str:
    """What shards ``model`` across processes ("FSDP2", "DTensor parameters"), or "".

    Such a model cannot take part in a meta run: FSDP2 manages its parameters itself (swapping
    or copying them corrupts its state: shards replaced by full tensors, freed storage), and a
    DTensor cannot be mixed with meta or plain tensors. Read from metadata only.

    >>> sharding(nn.Linear(2, 2))
    ''
    """
    if uses_fsdp(model):
        return "FSDP2 (fully_shard)"
    if any(is_dtensor(p) for p in model.parameters()):
        return "DTensor parameters"
    return ""


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


def meet_on_meta(args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """When an op mixes meta and real tensors, the real ones as meta twins; else None.

    A meta run keeps the inputs and what is computed from them alone real (token ids, an
    attention mask and the checks code makes on it, ``mask.all()``), while the weights and
    everything they touch are meta. Where the two meet (``scores + mask``) the real operand
    joins the meta side: torch would refuse the mix. Lists are looked into one level
    (``torch.cat([a, b])``).

    >>> real, meta = torch.ones(2), torch.ones(2, device="meta")
    >>> args, _ = meet_on_meta((meta, real), {})
    >>> [t.device.type for t in args]
    ['meta', 'meta']
    >>> meet_on_meta((real, real), {}) is None
    True
    """
    found_meta = found_real = False
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                found_meta = True
            else:
                found_real = True
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    if item.is_meta:
                        found_meta = True
                    else:
                        found_real = True
    if not (found_meta and found_real):
        return None
    with torch._C.DisableTorchFunction():  # the move is ours, not one of the model's ops
        return _moved(args), {name: _moved_one(value) for name, value in kwargs.items()}


def _moved_one(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return to_meta(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_moved(value)) if type(value) in (list, tuple) else value
    return value


def _moved(values: Any) -> tuple[Any, ...]:
    return tuple(_moved_one(v) for v in values)


# Factories whose values code may read (positions, masks, cache positions): made real when they
# are small enough to cost nothing, wherever the code asked for its activations' device, "meta".
_FACTORIES = frozenset({"arange", "range", "linspace", "logspace", "zeros", "ones", "full", "eye",
                        "tensor", "as_tensor", "scalar_tensor", "tril_indices", "triu_indices"})
_REAL_LIMIT = 1 << 20  # elements: a 1024 x 1024 mask


def stays_real(name: str) -> bool:
    """Whether :func:`keep_real` has anything to do for an op of this name."""
    return name == "to" or name in _FACTORIES


def keep_real(func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              home: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` that keep real data real where code sends it to its activations'
    device, which in a meta run is ``"meta"``: ``mask.to(x.device)`` keeps ``mask`` real (only
    its dtype changes), and ``torch.arange(T, device=x.device)`` is made on ``home``, the
    device the weights were on, when it is small. Such tensors become meta where they meet a
    meta one (:func:`meet_on_meta`), so shapes are the same, and their values can still be read
    (``mask.all()`` in Hugging Face's masking code).

    >>> mask = torch.ones(2, 3)
    >>> args, kwargs = keep_real(torch.Tensor.to, "to", (mask, "meta", torch.bool), {},
    ...                          torch.device("cpu"))
    >>> torch.Tensor.to(*args, **kwargs).device
    device(type='cpu')
    """
    if name == "to":
        tensor = args[0] if args else None
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            return args, kwargs
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
        if device is None or device.type != "meta":
            return args, kwargs
        options: dict[str, Any] = {"non_blocking": non_blocking, "copy": kwargs.get("copy", False)}
        if memory_format is not None:
            options["memory_format"] = memory_format
        return (tensor, tensor.device, dtype or tensor.dtype), options
    target = kwargs.get("device")
    if target is None or torch.device(target).type != "meta":
        return args, kwargs
    with torch._C.DisableTorchFunction():
        shaped = func(*args, **kwargs)  # on meta: costs nothing, tells the size
    if not isinstance(shaped, torch.Tensor) or shaped.numel() > _REAL_LIMIT:
        return args, kwargs
    return args, {**kwargs, "device": home}


_autocast_lock = threading.Lock()
_autocast_users = 0
_autocast_init: Any = None


@contextmanager
def autocast_accepts_meta() -> Iterator[None]:
    """While the block runs, ``torch.autocast(device_type="meta")`` is a CPU autocast.

    Code that follows its tensors' device (``autocast(x.device.type, enabled=False)`` in
    x-transformers' rotary embedding) would enter autocast on ``"meta"``, which torch refuses
    ("unsupported scalarType"); meta tensors have no autocast kernels, so the CPU one is what
    such a block does to them: nothing. Other device types are untouched. Thread-safe: the
    patch stays while any meta run uses it, and torch's own ``__init__`` comes back after.

    >>> with autocast_accepts_meta(), torch.autocast("meta", enabled=False):
    ...     pass
    """
    global _autocast_users, _autocast_init
    autocast = torch.amp.autocast_mode.autocast
    with _autocast_lock:
        if _autocast_users == 0:
            _autocast_init = original = autocast.__init__

            def __init__(self: Any, device_type: str, *args: Any, **kwargs: Any) -> None:
                original(self, "cpu" if device_type == "meta" else device_type, *args, **kwargs)

            autocast.__init__ = __init__  # type: ignore[method-assign]
        _autocast_users += 1
    try:
        yield
    finally:
        with _autocast_lock:
            _autocast_users -= 1
            if _autocast_users == 0:
                autocast.__init__ = _autocast_init  # type: ignore[method-assign]


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

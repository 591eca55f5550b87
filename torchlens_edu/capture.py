"""Capture activations (and their gradients) by module path, into an :class:`ActivationCache`.

::

    with tle.inspect(model).capture("transformer.h.*.attn", grads=True) as cache:
        model(ids).logsumexp(-1).mean().backward()
    cache                                   # a table: shapes with named dims, stats, NaN/Inf
    cache["transformer.h.0.attn"]           # the output tensor (B, T, C)
    cache.grad("transformer.h.0.attn")      # d loss / d output

The cache holds the *latest* forward of the model (a new forward starts a fresh cache, like
TransformerLens' ``run_with_cache``); modules called several times per forward keep every call,
``cache[path, call]``. A module reachable under several paths (a tied projection registered
under two parents) is captured once per call, keyed by the path the pattern matched;
``cache[other_path]`` finds it under any of its other paths too. Gradients arrive during
``backward()``, so run it inside the block.

Memory: before the first forward is captured, a shape-only run estimates what the capture
will hold, and the capture refuses (:class:`CaptureTooLarge`) above ``max_bytes``. That run uses
a meta copy of the model without its hooks (``meta_twin``), outside every torch-function mode:
the user's hooks, other hook sets, shape traces and NaN watches never see it. The estimate
is cached per model, pattern and input shapes, so capturing in a loop costs one meta run. When
the model cannot be copied or run on meta tensors (value-dependent code), the bytes are counted
as they are captured and the capture stops as soon as they would pass the limit.

Threads: each capture holds the forwards of the thread that opened it (see ``hookset``).
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.arguments import require_flag
from torchlens_edu._core.console import render_html, render_text
from torchlens_edu._core.formatting import did_you_mean, format_bytes, short_dtype
from torchlens_edu._core.interrupts import safe_contextmanager
from torchlens_edu._core.modules import (
    Pattern,
    every_path,
    match_modules,
    module_aliases,
    require_module,
)
from torchlens_edu._core.replay_state import replaying
from torchlens_edu._core.tree import iter_tensors, map_tensors
from torchlens_edu.dims import Dims, dims_argument
from torchlens_edu.hookset import HookCall, HookSet
from torchlens_edu.printing.stats import padded_shape
from torchlens_edu.shapes.meta import inputs_to_meta, meta_twin, sharding, twin_running

DEFAULT_MAX_BYTES = 2 * 2**30  # 2 GiB: more than a learner means to keep by accident
_MAX_ROWS = 80  # table rows shown before "... N more"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# model -> {(pattern, input specs, grads, inputs): estimated bytes or None (no meta run)}
_ESTIMATES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int | None]] = \
    weakref.WeakKeyDictionary()


class CaptureTooLarge(MemoryError):
    """The capture would hold more memory than its limit (``max_bytes``).

    >>> m = nn.Linear(4, 4)
    >>> try:
    ...     with capture(m, "*", max_bytes=16):
    ...         _ = m(torch.zeros(2, 4))
    ... except CaptureTooLarge as err:
    ...     print(str(err).split(".")[0])
    capturing '*' (1 modules) would hold 32 B in one forward, above the limit of 16 B
    """


@dataclass(kw_only=True)
class Activation:
    """One captured call of one module: its output, and on request its inputs and gradients.

    ``grads`` has one entry per tensor of ``output`` (in ``iter_tensors`` order), ``None`` for
    a tensor whose gradient was not computed.
    """

    path: str
    call: int
    output: Any
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] | None = None
    grads: list[torch.Tensor | None] = field(default_factory=list)
    versions: tuple[int | None, ...] = ()  # version counters of kept tensors that alias

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(iter_tensors(self.output))

    @property
    def grad(self) -> Any:
        """Gradients shaped like ``output`` (same container), ``None`` where none arrived."""
        grads = iter(self.grads)
        return map_tensors(lambda _: next(grads, None), self.output)

    @property
    def modified_in_place(self) -> bool:
        """True when the model changed the captured tensors in place after the capture (they
        share memory with the model's activations unless ``clone=True`` or a device move)."""
        return any(v is not None and t._version != v
                   for t, v in zip(self.tensors, self.versions, strict=False))


class ActivationCache:
    """Activations of one forward, keyed by module path (and call index).

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> with capture(m, "0") as cache:
    ...     _ = m(torch.zeros(2, 4))
    >>> cache["0"].shape
    torch.Size([2, 8])
    >>> list(cache)
    [('0', 0)]
    """

    def __init__(self, dims: Mapping[str, int] | None = None) -> None:
        self.dims = Dims(dims)
        self.forwards = 0  # forwards seen; the cache holds the latest
        self.estimate: int | None = None  # bytes the shape-only run predicted
        self.note = ""  # why there is no estimate, when there is none
        self.never_called: list[tuple[str, str]] = []  # matched modules that never ran: why
        self.aliases: dict[str, str] = {}  # another path of a captured module -> its key path
        self.untied_grads = 0  # gradients of recomputed calls no captured call could be tied to
        self.no_weights: list[str] = []  # nn.MultiheadAttention calls with need_weights=False
        self.averaged: list[str] = []  # ... whose weights are averaged over the heads
        self.grads_requested = False  # capture(..., grads=True)
        self._entries: dict[tuple[str, int], Activation] = {}
        self._held = 0  # bytes captured in this forward, for the limit

    # -- reading ----------------------------------------------------------------------------

    def __getitem__(self, key: str | tuple[str, int]) -> Any:
        """``cache[path]`` (a module called once) or ``cache[path, call]``: the output."""
        return self.activation(*key if isinstance(key, tuple) else (key,)).output

    def activation(self, path: str, call: int | None = None) -> Activation:
        """The :class:`Activation` of ``path`` (``call`` required when it ran several times).

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> cache.activation("0").output.shape
        torch.Size([3, 8])
        """
        if not isinstance(path, str):  # cache[0] for the Sequential's first layer: "0"
            fix = f": write cache[{str(path)!r}]" if type(path) is int else ""
            raise TypeError(f"the cache is keyed by module path, a str such as "
                            f"'transformer.h.0.attn', not {type(path).__name__} "
                            f"{path!r:.40}{fix}")
        calls = [a for (p, _), a in self._entries.items() if p == path]
        if not calls and path in self.aliases:  # the same module, by another of its paths
            path = self.aliases[path]
            calls = [a for (p, _), a in self._entries.items() if p == path]
        if not calls:
            raise KeyError(self._missing(path))
        if call is None:
            if len(calls) > 1:
                raise KeyError(f"'{path}' ran {len(calls)} times in this forward: pick a call, "
                               f"cache['{path}', 0] ... cache['{path}', {len(calls) - 1}]")
            return calls[0]
        entry = self._entries.get((path, call))
        if entry is None:
            raise KeyError(f"'{path}' has calls 0..{len(calls) - 1} in this forward, not {call}")
        return entry

    def grad(self, path: str, call: int | None = None) -> Any:
        """Gradient of the loss w.r.t. ``path``'s output (after ``backward()``; ``grads=True``).

        Shaped like the output; ``None`` where no gradient arrived.

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> cache.grad("2")
        tensor([[1.],
                [1.],
                [1.]])
        """
        entry = self.activation(path, call)
        if not self.grads_requested:
            raise KeyError("gradients were not captured: use capture(..., grads=True), then "
                           "call loss.backward()")
        if not any(g is not None for a in self._entries.values() for g in a.grads):
            raise RuntimeError("no gradient has reached a captured output: call loss.backward() "
                               "inside the `with` block (its gradient hooks end with it), on "
                               "outputs made with gradients on (not under torch.no_grad())")
        return entry.grad

    def inputs(self, path: str, call: int | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` the module was called with (needs ``inputs=True``).

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> args, kwargs = cache.inputs("1")
        >>> args[0].shape, kwargs
        (torch.Size([3, 8]), {})
        """
        entry = self.activation(path, call)
        if entry.args is None:
            raise KeyError("inputs were not captured: use capture(..., inputs=True)")
        return entry.args, entry.kwargs or {}

    def _missing(self, path: str) -> str:
        paths = sorted({p for p, _ in self._entries})
        never = dict(self.never_called)
        if path in never:
            return f"'{path}' matched but was never called: {never[path]}"
        if not paths and not self.forwards:
            return (f"nothing captured yet for '{path}': run the model inside the `with` block "
                    "(the cache fills during the forward)")
        # a captured module's other paths find it too: offer them, never the path asked for
        known = [p for p in [*paths, *(a for a, p in self.aliases.items() if p in paths)]
                 if p != path]
        hint = did_you_mean(path, known, n=3, cutoff=0.5, quote=False, start=True)
        hint = f" {hint}" if hint else ""
        shown = ", ".join(repr(p) if p else "'' (the model)" for p in paths[:8])
        return (f"'{path}' was not captured.{hint} Captured: {shown}"
                f"{' ...' if len(paths) > 8 else ''}")

    def __contains__(self, key: object) -> bool:
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str):
            return key in self._entries or (self.aliases.get(key[0]), key[1]) in self._entries
        if not isinstance(key, str):
            return False
        return any(p in (key, self.aliases.get(key)) for p, _ in self._entries)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[str, int]]:
        """``(path, call)`` of every captured call, in the order they finished.

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> cache.keys()
        [('0', 0), ('1', 0), ('2', 0), ('', 0)]
        """
        return list(self._entries)

    def items(self) -> list[tuple[tuple[str, int], Any]]:
        """``((path, call), output)`` of every captured call.

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> [(key, out.shape) for key, out in cache.items()][0]
        (('0', 0), torch.Size([3, 8]))
        """
        return [(key, a.output) for key, a in self._entries.items()]

    def paths(self) -> list[str]:
        """Captured module paths, in the order their calls finished, each once.

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> cache.paths()
        ['0', '1', '2', '']
        """
        return list(dict.fromkeys(p for p, _ in self._entries))

    def to_dict(self) -> dict[str, Any]:
        """``{"path": output}``; modules called several times as ``"path#call"``.

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> list(cache.to_dict())
        ['0', '1', '2', '']
        """
        counts: dict[str, int] = {}
        for path, _ in self._entries:
            counts[path] = counts.get(path, 0) + 1
        return {(p if counts[p] == 1 else f"{p}#{c}"): a.output
                for (p, c), a in self._entries.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (outputs, inputs, gradients).

        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with capture(m, "*", grads=True, inputs=True) as cache:
        ...     m(torch.ones(3, 4)).sum().backward()
        >>> cache.nbytes
        720
        """
        total = 0
        for a in self._entries.values():
            held = [*a.tensors, *(g for g in a.grads if g is not None)]
            if a.args is not None:
                held += list(iter_tensors((a.args, a.kwargs)))
            total += sum(_nbytes(t) for t in held)
        return total

    # -- showing ----------------------------------------------------------------------------

    def __rich__(self) -> Table:
        estimate = f", estimated {format_bytes(self.estimate)}" if self.estimate else ""
        title = f"ActivationCache: {len(self)} calls, {format_bytes(self.nbytes)}{estimate}"
        rows = self._rows()
        has_grads = any(g is not None for a in self._entries.values() for g in a.grads)
        names = ["module", "shape", "dtype", "values", "NaN/Inf", "grad"]
        dtypes = {row[2] for row in rows if row[2]}
        if len(dtypes) <= 1:  # one dtype for all: say it once, in the title
            title += f", all {dtypes.pop()}" if dtypes else ""
            names.remove("dtype")
        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        if not has_grads:
            names.remove("grad")
        picked = [["module", "shape", "dtype", "values", "NaN/Inf", "grad"].index(n) for n in names]
        rows = [[row[i] for i in picked] for row in rows]
        for i, name in enumerate(names):
            widest = max((len(str(row[i])) for row in rows), default=0)
            if name == "values":  # the numbers wrap when space is short; the rest stays whole
                table.add_column(name, ratio=1, min_width=20)
            else:
                table.add_column(name, no_wrap=True, overflow="ellipsis",
                                 min_width=max(len(name), min(widest, 40)),
                                 justify="right" if name == "NaN/Inf" else "left")
        for row in rows[:_MAX_ROWS]:
            table.add_row(*row)
        if len(rows) > _MAX_ROWS:
            table.add_row(Text(f"... {len(rows) - _MAX_ROWS} more rows", "dim"))
        notes = [self.note] if self.note else []
        if self.untied_grads:
            notes.append(f"{self.untied_grads} gradients not captured: they reached outputs a "
                         "reentrant checkpoint recomputed inside its block, which no captured "
                         "call can be tied to; checkpoint with use_reentrant=False to see them")
        if self.averaged:
            notes.append(
                f"{', '.join(p or '<model>' for p in self.averaged)}: out[1] holds "
                "nn.MultiheadAttention's attention weights averaged over its heads "
                "(average_attn_weights=True, the default); one map per head: call it with "
                "average_attn_weights=False")
        if self.no_weights:
            first = self.no_weights[0]
            notes.append(
                f"{', '.join(p or '<model>' for p in self.no_weights)}: nn.MultiheadAttention "
                "returned no attention weights (out[1] is None): its caller passed "
                "need_weights=False, as nn.TransformerEncoderLayer does. To see them, capture "
                f"with inputs=True, then args, kwargs = cache.inputs({first!r}); "
                f"model.get_submodule({first!r})(*args, **{{**kwargs, 'need_weights': True, "
                "'average_attn_weights': False})[1]")
        if any(a.modified_in_place for a in self._entries.values()):
            notes.append("* changed in place by the model after the capture: use clone=True")
        if not self._entries and self.never_called:
            runs = f"{self.forwards} forward{'s' if self.forwards > 1 else ''}"
            notes.append(f"empty: the model ran {runs}, but no matched module was called: "
                         + "; ".join(f"{path} ({why})" for path, why in self.never_called[:4]))
        elif not self._entries:
            notes.append("empty: run the model inside the `with` block")
        table.caption = "\n".join(notes) or None
        return table

    def _rows(self) -> list[list[Any]]:
        from torchlens_edu.printing import format_stats, tensor_stats

        counts: dict[str, int] = {}
        for path, _ in self._entries:
            counts[path] = counts.get(path, 0) + 1
        rows: list[list[Any]] = []
        for (path, call), a in self._entries.items():
            tensors = a.tensors
            if not tensors:  # it ran, and returned None (or no tensor): say so, not nothing
                name = (path or "<model>") + (f" #{call}" if counts[path] > 1 else "")
                what = "None" if a.output is None else f"a {type(a.output).__name__}, no tensor"
                rows.append([name, "—", "", f"returned {what}", Text("-", "dim"), "-"])
            for index, tensor in enumerate(tensors):
                name = (path or "<model>") + (f" #{call}" if counts[path] > 1 else "")
                name += f" out[{index}]" if len(tensors) > 1 else ""
                name += " *" if a.modified_in_place else ""
                stats = tensor_stats(tensor)
                bad = (stats.nan or 0) + (stats.posinf or 0) + (stats.neginf or 0)
                values = format_stats(dataclasses.replace(stats, nan=None, posinf=0, neginf=0),
                                      tensor.dtype)
                g = a.grads[index] if index < len(a.grads) else None
                grad = "-" if g is None else _grad_text(tensor_stats(g))
                shape = self.dims.format(padded_shape(tensor), dtype=tensor.dtype)
                rows.append([name, shape, short_dtype(tensor.dtype),
                             _short(values), Text(f"{bad}", "bold red" if bad else "dim"), grad])
        return rows

    def __repr__(self) -> str:
        return render_text(self, width=120)

    def _repr_html_(self) -> str:
        return render_html(self, width=120)


@safe_contextmanager
def capture(model: nn.Module, pattern: Pattern = "*", *, grads: bool = False,
            inputs: bool = False, device: torch.device | str | None = None, detach: bool = True,
            clone: bool = False, max_bytes: int | str | None = None,
            dims: Mapping[str, int] | None = None) -> Iterator[ActivationCache]:
    """Capture the outputs of the modules matching ``pattern`` while the block runs.

    - ``grads``: also the gradient w.r.t. each output, filled in by ``backward()``.
    - ``inputs``: also each call's ``(args, kwargs)``.
    - ``device``: move captured tensors there (e.g. ``"cpu"`` to free GPU memory).
    - ``detach``: cut captured tensors from the graph (default); ``clone``: copy them, so that
      in-place ops after the module cannot change what was captured.
    - ``max_bytes``: refuse captures larger than this (``int`` or ``"8GiB"``, ``"500MB"``);
      default 2 GiB.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with capture(m, "*", grads=True) as cache:
    ...     m(torch.ones(3, 4)).sum().backward()
    >>> cache.grad("2").shape, len(cache)
    (torch.Size([3, 1]), 4)
    """
    require_module(model, "capture()")
    for name, flag in (("grads", grads), ("inputs", inputs), ("detach", detach),
                       ("clone", clone)):
        require_flag(flag, name, "capture")
    dims = dims_argument(dims)
    limit = parse_bytes(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    cache = ActivationCache(dims)
    cache.grads_requested = grads
    matched = match_modules(model, pattern)
    paths = {path for path, _ in matched}
    aliases = module_aliases(model)
    cache.aliases = {other: path for path, module in matched
                     for other in aliases.get(module, ()) if other != path}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        kept = tensor.detach() if detach else tensor
        moved = kept.to(device) if device is not None else kept  # .to returns kept: no copy
        return moved.clone() if clone and moved is kept else moved

    with HookSet(model) as hookset:
        def start(call: HookCall) -> None:  # the model's forward begins
            if replaying() or call.recomputed:  # the step again (NaN watch, checkpoint)
                return
            cache._entries.clear()
            cache._held = 0
            cache.untied_grads = 0
            cache.no_weights.clear()
            cache.averaged.clear()
            cache.forwards += 1
            if cache.forwards == 1:
                cache.dims = Dims.infer(model, [call.args, call.kwargs], dims)
                cache.estimate, cache.note = _estimate(model, paths, call.args, call.kwargs,
                                                       grads, inputs, pattern)
                if cache.estimate is not None and cache.estimate > limit:
                    raise CaptureTooLarge(_too_large(cache.estimate, limit, pattern, len(paths)))

        def record(call: HookCall) -> None:
            if replaying() or call.recomputed:  # the step again (NaN watch, checkpoint)
                return
            output = map_tensors(keep, call.output)
            entry = Activation(path=call.path, call=call.call, output=output)
            if inputs:
                entry.args, entry.kwargs = map_tensors(keep, (call.args, call.kwargs))
            # Kept tensors that alias the model's: remember their version to spot later edits.
            entry.versions = tuple(
                _version_if_alias(t, src)
                for t, src in zip(iter_tensors(output), iter_tensors(call.output), strict=True))
            entry.grads = [None] * len(entry.tensors)
            held = entry.tensors + list(iter_tensors((entry.args, entry.kwargs)))
            _guard(cache, held, limit, pattern, len(paths))
            cache._entries[(call.path, call.call)] = entry
            if _without_weights(call) and call.path not in cache.no_weights:
                cache.no_weights.append(call.path)
            if _averaged_weights(call) and call.path not in cache.averaged:
                cache.averaged.append(call.path)

        def record_grad(call: HookCall) -> None:
            if replaying():  # the NaN watch re-running this step: already recorded
                return
            if call.recomputed and call.call < 0:  # made inside a reentrant checkpoint's rerun
                cache.untied_grads += 1
                return
            entry = cache._entries.get((call.path, call.call))
            if entry is not None and call.grad is not None and call.index < len(entry.grads) \
                    and not (call.recomputed and entry.grads[call.index] is not None):
                # a reentrant checkpoint's gradients arrive on the recomputed outputs
                grad = keep(call.grad)
                _guard(cache, [grad], limit, pattern, len(paths))
                entry.grads[call.index] = grad

        def end(call: HookCall) -> None:  # the model's forward is done: who never ran?
            if not call.recomputed:
                cache.never_called = hookset.never_called()

        hookset.forward_pre("", start)
        hookset.forward(pattern, record)
        hookset.forward("", end)
        if grads:
            hookset.backward(pattern, record_grad)
        yield cache


def _without_weights(call: HookCall) -> bool:
    """An ``nn.MultiheadAttention`` call that returned ``(output, None)``: no weights asked."""
    output = call.output
    return (isinstance(call.module, nn.MultiheadAttention) and isinstance(output, tuple)
            and len(output) == 2 and output[1] is None)


def _averaged_weights(call: HookCall) -> bool:
    """An ``nn.MultiheadAttention`` call whose weights are one map averaged over the heads:
    ``(B, T, S)`` for a ``(B, T, C)`` query (per head they are ``(B, nh, T, S)``)."""
    output, query = call.output, call.args[0] if call.args else call.kwargs.get("query")
    return (isinstance(call.module, nn.MultiheadAttention) and isinstance(output, tuple)
            and len(output) == 2 and isinstance(output[1], torch.Tensor)
            and isinstance(query, torch.Tensor) and output[1].dim() == query.dim())


def _estimate(model: nn.Module, paths: set[str], args: tuple, kwargs: dict, grads: bool,
              inputs: bool, pattern: Pattern) -> tuple[int | None, str]:
    """Bytes the capture will hold, from a shape-only run of a meta twin; cached per input
    shapes. The twin has no hooks and runs outside torch-function modes: nobody sees it."""
    if sharding(model):  # copying FSDP's state would corrupt the model: never copy it
        return None, _NO_ESTIMATE_SHARDED
    key = (pattern, _specs((args, kwargs)), grads, inputs)
    known = _ESTIMATES.setdefault(model, {})
    if key in known:
        nbytes = known[key]
        return nbytes, "" if nbytes is not None else _NO_ESTIMATE
    nbytes = 0

    def count(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        nonlocal nbytes
        held = list(iter_tensors(output)) * (2 if grads else 1)
        held += list(iter_tensors((args, kwargs))) if inputs else []
        nbytes += sum(_nbytes(t) for t in held)

    try:
        with torch._C.DisableTorchFunction(), twin_running():
            twin = meta_twin(model)
            counted = {module for path, module in every_path(twin) if path in paths}
            for module in counted:  # once per module, whichever of its paths was matched
                module.register_forward_hook(count, with_kwargs=True)
            meta_args, meta_kwargs = inputs_to_meta(args, kwargs)
            twin(*meta_args, **meta_kwargs)
    except Exception:  # value-dependent forward or uncopyable model: guard while capturing
        known[key] = None
        return None, _NO_ESTIMATE
    known[key] = nbytes
    return nbytes, ""


_NO_ESTIMATE_SHARDED = ("no estimate (a sharded model is not copied for a meta run); the bytes "
                        "were counted while capturing instead")
_NO_ESTIMATE = ("no estimate (the model cannot be copied or run on meta tensors); the bytes "
                "were counted while capturing instead")


def _grad_text(stats: Any) -> str:
    """``max|g|=0.3``: how big a gradient is, in the few characters a table has."""
    if stats.std is None or stats.min is None or stats.max is None:
        return stats.note or "-"
    bad = (stats.nan or 0) + (stats.posinf or 0) + (stats.neginf or 0)
    text = f"max|g|={max(abs(stats.min), abs(stats.max)):.3g}"
    return text + (f" NaN/Inf:{bad}" if bad else "")


def _short(stats: str) -> str:
    """Drop the sparkline from ``format_stats`` text: table cells have room for numbers only."""
    return " ".join(part for part in stats.split(" ") if not set(part) <= _BARS)


_BARS = set("▁▂▃▄▅▆▇█")


def _version_if_alias(kept: torch.Tensor, source: torch.Tensor) -> int | None:
    """``kept``'s version counter when it shares memory with ``source`` (then a later in-place
    op on ``source`` shows up as a new version), else None. Inference-mode and non-strided
    tensors have no version or pointer to compare: None."""
    if kept.layout != torch.strided or kept.is_inference() or kept.device != source.device:
        return None
    return kept._version if kept.data_ptr() == source.data_ptr() else None


def _specs(obj: Any) -> tuple:
    return tuple((tuple(padded_shape(t)), t.dtype, t.device.type) for t in iter_tensors(obj))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _guard(cache: ActivationCache, tensors: list[torch.Tensor], limit: int, pattern: Pattern,
           modules: int) -> None:
    """Count what is about to be kept; stop the capture before it passes the limit."""
    held = cache._held + sum(_nbytes(t) for t in tensors)
    if held > limit:
        cache._entries.clear()
        raise CaptureTooLarge(_too_large(held, limit, pattern, modules, partial=True))
    cache._held = held


def _too_large(nbytes: int, limit: int, pattern: Pattern, modules: int,
               partial: bool = False) -> str:
    what = "already reached" if partial else "would hold"
    return (f"capturing {pattern!r} ({modules} modules) {what} {format_bytes(nbytes)} in one "
            f"forward, above the limit of {format_bytes(limit)}. Narrow the pattern (e.g. "
            f"'transformer.h.0.*'), use a shorter input, capture to device='cpu', or raise the "
            f"limit: capture(..., max_bytes='8GiB').")


def parse_bytes(value: int | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"500MB"``, ``"1.5G"`` -> bytes.

    >>> parse_bytes("2GiB"), parse_bytes("500MB"), parse_bytes(1024)
    (2147483648, 500000000, 1024)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None or float(match.group(1)) <= 0:
        raise ValueError(f"max_bytes={value!r}: give a positive number of bytes or a size such "
                         "as '500MB' or '8GiB'")
    return int(float(match.group(1)) * unit)

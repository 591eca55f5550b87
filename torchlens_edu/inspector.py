"""``inspect(model)``: one object to look at any ``nn.Module`` with every tool of the toolkit.

::

    insp = tle.inspect(model)            # GPT-2 (ours or Hugging Face), BERT, TransformerLens...
    insp                                 # the module tree: parameter shapes (named) and counts
    insp.summary(ids)                    # torchinfo table: output shapes with named dims, params
    insp.modules("transformer.h.*.attn") # [(path, module), ...]
    with insp.capture("*.mlp") as cache: model(ids)
    insp.trace(ids)                      # shapes of every module call
    with insp.watch_nans(): train_step()

Parameter counts explain weight tying: GPT-2 small has 124M parameters because ``lm_head``
*is* ``transformer.wte`` (the same (V, C) matrix); summing every layer's parameters counts it
twice and gives 163M.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from rich.console import Group
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from torch.nn.parameter import is_lazy

from torchlens_edu._core.arguments import forward_keywords
from torchlens_edu._core.console import render_html, render_text
from torchlens_edu._core.formatting import format_count
from torchlens_edu._core.model_state import kept_state, private_inputs
from torchlens_edu._core.modules import (
    Pattern,
    also_reachable,
    eager_original,
    is_hook_point,
    match_modules,
    module_aliases,
    require_module,
)
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.capture import ActivationCache, capture
from torchlens_edu.dims import AxisRoles, Dims, dims_argument, model_parameter_axes
from torchlens_edu.hookset import HookCall, HookSet
from torchlens_edu.printing.stats import padded_shape


@dataclass(frozen=True, kw_only=True)
class ParamCount:
    """How many parameters a model has, and why a naive sum says more.

    ``unique`` counts every tensor once; ``naive`` sums over all parameter names, so a tied
    tensor (``lm_head.weight`` is ``transformer.wte.weight``) counts once per name. ``tied``
    lists the names that share one tensor, with its size.

    >>> lin = nn.Linear(4, 4, bias=False)
    >>> count_parameters(nn.ModuleDict({"a": lin, "b": nn.Linear(4, 4)})).unique
    36
    """

    unique: int
    trainable: int
    naive: int
    tied: list[tuple[list[str], int]] = field(default_factory=list)
    lazy: list[str] = field(default_factory=list)  # not sized yet: a lazy module never ran

    def explain(self) -> str:
        """One or two sentences a learner can read."""
        text = f"{self.unique:,} parameters ({format_count(self.unique)})"
        if self.trainable != self.unique:
            text += f", {self.trainable:,} trainable"
        if self.lazy:
            text += (f", and {len(self.lazy)} not sized yet ({', '.join(self.lazy[:3])}"
                     f"{', ...' if len(self.lazy) > 3 else ''}: lazy modules learn their sizes "
                     "from the first forward)")
        if not self.tied:
            return text + "."
        shared = "; ".join(f"{' = '.join(names)} ({numel:,})" for names, numel in self.tied)
        return (f"{text}. Tied weights, one tensor under several names: {shared}. A per-layer sum "
                f"counts them again and gives {self.naive:,} ({format_count(self.naive)}).")


def count_parameters(model: nn.Module) -> ParamCount:
    """:class:`ParamCount` of ``model``: unique, trainable, naive (per-name) and tied."""
    names: dict[int, list[str]] = defaultdict(list)
    tensors: dict[int, torch.Tensor] = {}
    lazy: list[str] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if is_lazy(p):  # an UninitializedParameter has no size to count
            lazy.append(name)
            continue
        names[id(p)].append(name)
        tensors[id(p)] = p
    unique = sum(t.numel() for t in tensors.values())
    trainable = sum(t.numel() for t in tensors.values() if t.requires_grad)
    naive = sum(tensors[key].numel() * len(n) for key, n in names.items())
    tied = [(list(dict.fromkeys(n)), tensors[key].numel()) for key, n in names.items()
            if len(set(n)) > 1]
    return ParamCount(unique=unique, trainable=trainable, naive=naive, tied=tied, lazy=lazy)


class Inspector:
    """The facade over hooks, capture, shape traces, NaN watches and stop points for one model.

    >>> from torchlens_edu.models import GPT2, GPT2Config
    >>> insp = inspect(GPT2(GPT2Config.preset("tiny")))
    >>> insp.dims["C"], insp.parameters().unique
    (32, 35712)
    """

    def __init__(self, model: nn.Module, *, dims: Mapping[str, int] | None = None) -> None:
        self.model = require_module(model, "inspect()")
        self._overrides = dims_argument(dims)
        self.dims = Dims.infer(self.model, (), self._overrides)

    # -- what is in the model -----------------------------------------------------------

    def parameters(self) -> ParamCount:
        """Parameter counts, explaining weight tying.

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> insp.parameters().unique
        58
        """
        return count_parameters(self.model)

    def modules(self, pattern: Pattern = "*") -> list[tuple[str, nn.Module]]:
        """``(path, module)`` pairs matching a glob or predicate, in model order.

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> [path for path, _ in insp.modules("*")]
        ['', '0', '1', '2']
        """
        return match_modules(self.model, pattern)

    def summary(self, *inputs: Any, depth: int = 3, **forward_kwargs: Any) -> ModelSummary:
        """A torchinfo table: every module to ``depth`` with its output shape (when inputs are
        given: one forward in eval mode under ``no_grad``; train/eval flags are restored) in
        named dims and its parameters, and a footer that explains the parameter count
        (weight tying). A ``torch.compile``'d model is summarized through its eager original
        (``model._orig_mod``), which its first row says.

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> insp.summary(torch.zeros(3, 4)).rows[1]
        ('0', 'Linear', 1, [torch.Size([3, 8])], 40)
        """
        import torchinfo.torchinfo as torchinfo

        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"summary(depth={depth!r:.40}): give a module depth >= 0 (the "
                             "model is depth 0, its children 1, ...)")
        # torch.compile'd: its eager original has the same modules, and runs without
        # TorchDynamo compiling the hooks into a graph
        model = eager_original(self.model)
        forward_keywords(model, forward_kwargs, ("depth",), "summary")
        inputs, forward_kwargs = private_inputs(inputs, forward_kwargs)  # a KV cache stays
        modes = {m: m.training for m in model.modules()}
        cached = dict(torchinfo._cached_forward_pass)  # it keeps the last model per class name
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # torchinfo calls model(*list) or model(**dict): keyword-only models pass a dict
        data: Any = list(inputs) if inputs else (dict(forward_kwargs) or None)
        extra = forward_kwargs if inputs else {}
        # torchinfo shows the *last* value of a dict output (HF's ModelOutput: often not the
        # logits); we note every module's output tensors ourselves during its forward
        outputs: dict[nn.Module, list[torch.Size]] = {}

        def note(call: HookCall) -> None:
            if call.module not in outputs:
                outputs[call.module] = [padded_shape(t) for t in iter_tensors(call.output)]

        def run_ourselves() -> Any:
            # the forward runs here, and torchinfo lists the modules without running one
            outputs.clear()
            model.eval()
            with kept_state(model), _fast_path_off(), HookSet(model) as h, torch.no_grad():
                h.forward("*", note)
                model(*inputs, **forward_kwargs)
            return torchinfo.summary(model, depth=depth, verbose=0)

        try:
            if _rebuilt_by_torchinfo((inputs, forward_kwargs)):
                stats = run_ourselves()
            else:
                # the forward is ours: caches, counters, the random stream stay as they were
                with kept_state(model), _fast_path_off(), HookSet(model) as h:
                    h.forward("*", note)
                    stats = torchinfo.summary(
                        model, input_data=data, depth=depth, verbose=0, device=device,
                        mode="eval", **extra)  # eval: BatchNorm statistics stay as they are
        except RuntimeError as error:
            cause = error.__cause__
            if not str(error).startswith("Failed to run torchinfo") or cause is None:
                raise
            if not str(cause).startswith(_TORCHINFO_TYPES):
                # torchinfo hides the model's own error behind "see above stack traces": show it
                if hasattr(cause, "add_note"):  # Python >= 3.11
                    cause.add_note(f"(raised by the forward that inspect(model).summary(...) "
                                   f"ran on {type(model).__name__} with the inputs you gave)")
                raise cause from None
            # torchinfo sizes only the outputs it knows (tensors, tuples, lists, dicts), not a
            # dataclass
            stats = run_ourselves()
        finally:
            torchinfo._cached_forward_pass.clear()
            torchinfo._cached_forward_pass.update(cached)
            for module, training in modes.items():  # torchinfo resets only the root's mode
                module.training = training
        dims = Dims.infer(model, [inputs, forward_kwargs], self._overrides)
        summary = ModelSummary(model, stats.summary_list, depth, dims, self.parameters(),
                               outputs)
        if model is not self.model and summary.notes:
            summary.notes[0] = "torch.compile's eager model._orig_mod"
        return summary

    # -- the tools, bound to this model ---------------------------------------------------

    def hooks(self) -> HookSet:
        """A :class:`~torchlens_edu.hookset.HookSet` on the model (use it in a ``with`` block).

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> with insp.hooks() as h:
        ...     h.forward("2", lambda call: None)
        ['2']
        """
        return HookSet(self.model)

    def capture(self, pattern: Pattern = "*", **options: Any
                ) -> AbstractContextManager[ActivationCache]:
        """``with insp.capture("transformer.h.*.attn", grads=True) as cache: ...``; see
        :func:`torchlens_edu.capture.capture` for the options.

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> with insp.capture("0") as cache:
        ...     _ = insp.model(torch.zeros(3, 4))
        >>> cache.activation("0").output.shape
        torch.Size([3, 8])
        """
        options.setdefault("dims", self._overrides)
        return capture(self.model, pattern, **options)

    def trace(self, *inputs: Any, **options: Any) -> Any:
        """Shapes of one forward: :func:`torchlens_edu.shapes.trace_shapes`.

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> insp.trace(torch.zeros(3, 4)).events[0].output_shapes
        [(3, 2)]
        """
        from torchlens_edu.shapes.tracer import trace_shapes

        options.setdefault("dims", self._overrides)
        return trace_shapes(self.model, *inputs, **options)

    def watch_nans(self, **options: Any) -> Any:
        """Stop at the first NaN/Inf: :func:`torchlens_edu.nans.watch_nans`.

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> with insp.watch_nans() as watch:
        ...     _ = insp.model(torch.zeros(3, 4))
        >>> watch.reports
        []
        """
        from torchlens_edu.nans.watch import watch_nans

        options.setdefault("dims", self._overrides)
        return watch_nans(self.model, **options)

    def compare(self, reference: nn.Module, *inputs: Any, **options: Any) -> Any:
        """Where this model first differs from ``reference``, down to the op and line:
        :func:`torchlens_edu.divergence.compare` (``rtol``, ``atol``, ``backward``, ``map``).

        >>> import torch.nn as nn
        >>> inspect(nn.Softmax(dim=0)).compare(nn.Softmax(dim=-1), torch.rand(2, 3)).first.op
        'softmax'
        """
        from torchlens_edu.divergence import compare

        return compare(self.model, reference, *inputs, **options)

    def stop_at(self, pattern: Pattern, **options: Any) -> Any:
        """Pause in the debugger at a module: :func:`torchlens_edu.debug.stop_at_module`.

        >>> insp = inspect(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> stop = insp.stop_at("2")  # the next forward pauses when the last Linear returns
        >>> stop.remove()
        """
        from torchlens_edu.debug import stop_at_module

        return stop_at_module(self.model, pattern, **options)

    # -- showing --------------------------------------------------------------------------

    def __rich__(self) -> Tree:
        return module_tree(self.model, self.dims)

    def __repr__(self) -> str:
        return render_text(self)

    def _repr_html_(self) -> str:
        return render_html(self)


_TORCHINFO_TYPES = "Model contains a layer with an unsupported input or output type"


def _rebuilt_by_torchinfo(value: Any) -> bool:
    """Whether torchinfo would rebuild an input as ``type(value)(list of its items)``: it does
    that to every iterable other than a tuple, list, dict or string (Hugging Face's
    ``DynamicCache`` came back broken)."""
    if isinstance(value, (tuple, list)):
        return any(_rebuilt_by_torchinfo(item) for item in value)
    if isinstance(value, dict):
        return any(_rebuilt_by_torchinfo(item) for item in value.values())
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, torch.Tensor))


@contextmanager
def _fast_path_off() -> Iterator[None]:
    """PyTorch's fused attention fast path off: in eval under no_grad ``nn.TransformerEncoder``
    packs a padded batch into a nested tensor, which has no sizes for a summary to list."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def inspect(model: nn.Module, *, dims: Mapping[str, int] | None = None) -> Inspector:
    """An :class:`Inspector` for ``model``; ``dims`` names sizes (``{"B": 4}``) on top of what
    the model's config says.

    >>> import torch.nn as nn
    >>> inspect(nn.Linear(3, 2)).parameters().unique
    8
    """
    return Inspector(model, dims=dims)


# -- the module tree (Inspector's repr) ---------------------------------------------------

def module_tree(model: nn.Module, dims: Dims) -> Tree:
    """A rich Tree: each module with its class, own parameters (named shapes) and total count.

    Repeated siblings with the same structure (``h.1`` ... ``h.11`` like ``h.0``) fold into
    one line, and a tensor shared with an earlier module says where it lives.
    """
    count = count_parameters(model)
    root = Tree(Text.assemble((type(model).__name__, "bold"), "  ", count.explain()))
    seen: dict[int, str] = {}  # id(tensor or module) -> first path
    _grow(root, model, "", dims, seen, module_aliases(model), model_parameter_axes(model))
    return root


def _grow(node: Tree, module: nn.Module, path: str, dims: Dims, seen: dict[int, str],
          aliases: dict[nn.Module, list[str]], axes: dict[int, AxisRoles]) -> None:
    for name, p in module.named_parameters(recurse=False):
        full = f"{path}.{name}" if path else name
        if is_lazy(p):
            node.add(Text.assemble(("· ", "dim"), name, " ", ("not sized yet (lazy: the first "
                                                             "forward sizes it)", "yellow")))
            continue
        shape = dims.format(p.shape, axes=axes.get(id(p)))  # wpe.weight is (ctx, C)
        line = Text.assemble(("· ", "dim"), name, " ", shape, "  ", (f"{p.numel():,}", "cyan"))
        if id(p) in seen:
            line.append(f"  tied: same tensor as {seen[id(p)]}", "yellow")
        else:
            seen[id(p)] = full
        if not p.requires_grad:
            line.append("  frozen", "dim")
        node.add(line)
    children = [(n, c) for n, c in module.named_children() if not is_hook_point(c)]
    points = [n for n, c in module.named_children() if is_hook_point(c)]
    if points:  # identities, not layers: one line says what can be captured here
        node.add(Text(f"hook points: {', '.join(points)}", "dim"))
    shown = 0
    while shown < len(children):
        name, child = children[shown]
        full = f"{path}.{name}" if path else name
        repeats = _repeats(children, shown)
        label = Text.assemble((name, "bold"), " ", (type(child).__name__, "magenta"), "  ",
                              (format_count(_own_total(child)), "cyan"))
        if id(child) in seen:  # the same module object again: its calls are hooked once
            node.add(label.append(f"  same module as {seen[id(child)]}", "yellow"))
            shown += 1
            continue
        seen[id(child)] = full
        also = also_reachable(aliases.get(child, []), full)
        branch = node.add(label.append(f"  {also}", "yellow") if also else label)
        _grow(branch, child, full, dims, seen, aliases, axes)
        if repeats:
            last = children[shown + repeats][0]
            each = format_count(_own_total(child))
            node.add(Text(f"{children[shown + 1][0]} … {last}: {repeats} more "
                          f"{type(child).__name__} like {name} ({each} each)", "dim"))
            for _, twin in children[shown + 1: shown + repeats + 1]:
                for p in twin.parameters():
                    seen.setdefault(id(p), full)
        shown += repeats + 1


def _repeats(children: list[tuple[str, nn.Module]], index: int) -> int:
    """How many numbered siblings after ``children[index]`` (``h.1``, ``h.2``, ... after
    ``h.0``) have its exact structure; 0 unless at least two would fold."""
    name, first = children[index]
    if not name.isdigit():
        return 0
    signature = _signature(first)
    count = 0
    for other_name, other in children[index + 1:]:
        if not other_name.isdigit() or other is first or _signature(other) != signature:
            break
        count += 1
    return count if count >= 2 else 0


def _signature(module: nn.Module) -> tuple:
    return tuple((name, type(m).__name__, tuple((n, None if is_lazy(p) else tuple(p.shape))
                                               for n, p in m.named_parameters(recurse=False)))
                 for name, m in module.named_modules())


def _layer_path(layer: Any) -> str:
    """The dotted path of a torchinfo row: the attribute names from the model down to it (a
    module under two parents has a row under each, each with its own path)."""
    names = []
    while layer.parent_info is not None:
        names.append(layer.var_name)
        layer = layer.parent_info
    return ".".join(reversed(names))


def _own_total(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if not is_lazy(p))


# -- summary --------------------------------------------------------------------------------

class ModelSummary:
    """What :meth:`Inspector.summary` returns: torchinfo's rows, shown with named dims.

    ``rows`` are ``(path, class name, depth, output shapes, parameters)``; ``output shapes``
    lists the shapes of every tensor the module returned on its first call (empty without
    inputs, or for a module that did not run). ``notes`` says, row by row, where a module
    reachable under several paths also is (``"also reachable as mlm.decoder"``, on its first
    row) or that a row repeats one (``"same module as generator.proj"``).
    """

    def __init__(self, model: nn.Module, layers: list[Any], depth: int, dims: Dims,
                 params: ParamCount, outputs: Mapping[nn.Module, list[torch.Size]]) -> None:
        aliases = module_aliases(model)
        self.dims, self.params = dims, params
        self.rows: list[tuple[str, str, int, list[torch.Size], int]] = []
        self.notes: list[str] = []
        shown: dict[nn.Module, str] = {}  # module -> the path of its first row
        rows_of: dict[nn.Module, int] = {}  # module -> its rows so far
        for layer in layers:
            if layer.depth > depth or is_hook_point(layer.module):
                continue
            path = _layer_path(layer)
            self.rows.append((path, layer.class_name, layer.depth,
                              outputs.get(layer.module, []), _own_total(layer.module)))
            rows_of[layer.module] = rows_of.get(layer.module, 0) + 1
            if layer.module in shown and shown[layer.module] == path:  # a forward's 2nd call
                self.notes.append(f"same module, call {rows_of[layer.module]}")
            elif layer.module in shown:
                self.notes.append(f"same module as {shown[layer.module] or '<model>'}")
            else:
                shown[layer.module] = path
                self.notes.append(also_reachable(aliases.get(layer.module, []), path))

    def __iter__(self) -> Iterator[tuple[str, str, int, list[torch.Size], int]]:
        return iter(self.rows)

    def __rich__(self) -> Group:
        # In a narrow console the paths' notes and the shapes wrap; nothing is cut or dropped
        # (a column of no_wrap cells that does not fit takes the width of the others)
        table = Table(show_edge=False, pad_edge=False, title_justify="left")
        table.add_column("module", overflow="fold")
        table.add_column("class", style="magenta", overflow="fold")
        table.add_column("output", overflow="fold")
        table.add_column("params", justify="right", style="cyan", no_wrap=True)
        for (path, cls, depth, output, params), note in zip(self.rows, self.notes, strict=True):
            shape = self.dims.format(output[0]) if output else ""
            if len(output) > 1:  # tuples, dicts, ModelOutput: the first tensor, and a count
                shape += f" +{len(output) - 1} more"
            name = Text("  " * depth + (path.rsplit(".", 1)[-1] or "<model>"))
            if note:  # one module under several paths
                name.append(f" ({note})", "yellow")
            table.add_row(name, cls, shape, f"{params:,}" if params else "-")
        return Group(table, Text(self.params.explain()))

    def __repr__(self) -> str:
        return render_text(self, width=110)

    def _repr_html_(self) -> str:
        return render_html(self, width=110)

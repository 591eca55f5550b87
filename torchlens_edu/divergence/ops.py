"""The op-level recording: every torch call inside one module call, with its user's line, its
operands and results (copies), which recorded op made each operand, and the names the user's
code gives them.

Runs only inside the first diverging module (the module-level pass found it), with the op
recorder of the shape tracer (:class:`~torchlens_edu.shapes.ops.OpRecorder`). What the ops are
compared with, and which one is blamed, is ``blame.py``; the steps of fused ops are
``steps.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchlens_edu._core.frames import source_location
from torchlens_edu._core.sites import Site, source_text, user_site
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.shapes.ops import OpRecorder, tensors_in, tensors_out

# fused ops whose arguments are kept, so that steps.py can compute their steps
FUSED = frozenset({"scaled_dot_product_attention", "gelu", "layer_norm", "linear", "addmm",
                   "softmax"})


@dataclass(kw_only=True)
class OpCall:
    """One recorded torch call (or one step of a fused one, see ``steps.py``)."""

    name: str  # as the shape tracer names it: "softmax", "matmul", "[]", "div"
    source: str  # "file.py:LINE" of the user's line ("" when unknown)
    inputs: list[torch.Tensor]  # copies, taken when the op ran
    outputs: list[torch.Tensor]
    parameters: list[str | None]  # for each input: the parameter it is, if it is one
    producers: list[tuple[int, int] | None]  # for each input: (op, which of its outputs) that
    # made it, when a recorded op did
    names: list[str] = field(default_factory=list)  # for each input: the user's name for it
    output_names: list[str] = field(default_factory=list)
    module: str = ""  # the path of the module whose code called it (the target's, if unknown)
    step: str = ""  # a step of a fused op: what it computes ("q @ kᵀ"); name is then the step's
    fused: str = ""  # ... and this is the fused op it belongs to
    arguments: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # FUSED ops only
    live_inputs: list[torch.Tensor] = field(default_factory=list)  # keep_graph runs only
    live_outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def shown(self) -> str:
        """How the op is named in a report: ``softmax``, or ``scaled_dot_product_attention``
        for one of its steps."""
        return self.fused or self.name


def _local_names(frame: Any, tensors: list[torch.Tensor]) -> list[str]:
    """The user's local variable that holds each tensor (``q``), or ``""``."""
    found: dict[int, str] = {}
    for name, value in frame.f_locals.items():
        if isinstance(value, torch.Tensor) and not name.startswith("_"):
            found.setdefault(id(value), name)
    return [found.get(id(t), "") for t in tensors]


def assigned_names(filename: str, line: int, count: int) -> list[str]:
    """The names a one-line assignment gives its value: ``att = F.softmax(...)`` -> ``att``,
    ``q, k, v = ...split(C, dim=2)`` -> ``q, k, v`` (``count`` of them), else ``""`` each.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.py")
    >>> _ = open(path, "w").write("att = F.softmax(scores, dim=-1)  # (B, nh, T, T)\\n")
    >>> assigned_names(path, 1, 1)
    ['att']
    """
    text = source_text(filename, line)
    try:
        statement = ast.parse(text).body[0] if text else None
    except SyntaxError:  # one line of a longer statement
        return [""] * count
    if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
        return [""] * count
    target = statement.targets[0]
    targets = target.elts if isinstance(target, ast.Tuple) else [target]
    names = [t.id if isinstance(t, ast.Name) else "" for t in targets]
    return names if len(names) == count else [""] * count


class _OpLog:
    """An :class:`~torchlens_edu.shapes.ops.OpListener` that keeps the ops of one module call."""

    ops = True  # record op events (not only count them)
    meta = False
    home = torch.device("cpu")

    def __init__(self, parameter_names: dict[int, str], module_paths: dict[int, str],
                 keep_graph: bool) -> None:
        self.calls: list[OpCall] = []
        self.sites: list[tuple[str, int] | None] = []
        self.active = False
        self.returned_by: list[tuple[int, int] | None] = []  # who made what the call returned
        self._parameter_names = parameter_names
        self._module_paths = module_paths
        self.path = ""  # the recorded module call's own path
        self._keep_graph = keep_graph
        self._made_by: dict[int, tuple[int, int]] = {}  # id(tensor) -> (op, output) that made it
        self._alive: list[torch.Tensor] = []  # keeps those ids from being reused

    def op_done(self, name: str, args: Any, kwargs: dict[str, Any], result: Any,
                frame: Any) -> None:
        if not self.active:
            return
        found = user_site(frame)
        site = (found.filename, found.line) if found is not None else None
        inputs, outputs = tensors_in(args, kwargs), tensors_out(result)
        user = frame
        while user is not None and site is not None and user.f_code.co_filename != site[0]:
            user = user.f_back
        module = self.path
        caller = user
        while caller is not None:  # the nearest method of one of the model's modules
            owner = self._module_paths.get(id(caller.f_locals.get("self")))
            if owner is not None:
                module = owner
                break
            caller = caller.f_back
        # values: copies, or (a backward run, which keeps the graph) the tensors themselves
        keep = (lambda t: t.detach()) if self._keep_graph else (lambda t: t.detach().clone())
        self.calls.append(OpCall(
            name=name, source=source_location(*site) if site else "",
            inputs=[keep(t) for t in inputs], outputs=[keep(t) for t in outputs],
            module=module,
            parameters=[self._parameter_names.get(id(t)) for t in inputs],
            producers=[self.made_by(t) for t in inputs],
            names=_local_names(user, inputs) if user is not None else [""] * len(inputs),
            arguments=(_copied(args), _copied(kwargs)) if name in FUSED else None,
            live_inputs=list(inputs) if self._keep_graph else [],
            live_outputs=list(outputs) if self._keep_graph else []))
        self.sites.append(site)
        for k, tensor in enumerate(outputs):
            self._made_by[id(tensor)] = (len(self.calls) - 1, k)
            self._alive.append(tensor)

    def made_by(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """The recorded op that returned ``tensor``, if one did."""
        return self._made_by.get(id(tensor))

    def op_failed(self, name: str, args: Any, kwargs: dict[str, Any], exc: Exception,
                  site: Site | None) -> None:
        """A failing op fails the run itself; there is nothing to keep."""

    def finish(self) -> list[OpCall]:
        """Name each op's outputs where the user's line assigns them (the last op of a line)."""
        for position, (op, site) in enumerate(zip(self.calls, self.sites, strict=True)):
            later = self.sites[position + 1:]
            if site is not None and site not in later:
                op.output_names = assigned_names(*site, len(op.outputs))
            else:
                op.output_names = [""] * len(op.outputs)
        return self.calls


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def record_ops(model: nn.Module, run: Callable[[], Any], target: tuple[str, int], *,
               keep_graph: bool = False) -> tuple[list[OpCall], list[tuple[int, int] | None], Any]:
    """The ops of call ``target = (path, index)`` of a module of ``model`` while ``run()`` runs,
    the ops that made what the call returned (``None`` for a tensor no op made), and what
    ``run()`` returned. ``keep_graph``: the ops also keep their real operands and
    results (for the backward pass)."""
    path, index = target
    module = model.get_submodule(path)
    log = _OpLog({id(p): name for name, p in model.named_parameters(remove_duplicate=False)},
                 {id(m): name for name, m in model.named_modules(remove_duplicate=False)},
                 keep_graph)
    log.path = path
    calls = 0

    def enter(*_: Any) -> None:
        nonlocal calls
        log.active = calls == index
        calls += 1

    def leave(_module: nn.Module, _args: Any, output: Any) -> None:
        if log.active:
            log.returned_by = [log.made_by(t) for t in iter_tensors(output)]
        log.active = False

    handles = [module.register_forward_pre_hook(enter),
               module.register_forward_hook(leave, always_call=True)]
    try:
        with OpRecorder(log):
            returned = run()
    finally:
        for handle in handles:
            handle.remove()
    return log.finish(), log.returned_by, returned

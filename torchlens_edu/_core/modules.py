"""Find modules by their path in the model (``transformer.h.3.attn``) with glob patterns.

Patterns are ``fnmatch`` globs over dotted paths (``transformer.h.*.attn``, ``*.mlp``,
``lm_head``) or predicates ``(path, module) -> bool``. The root module's path is ``""``.
A pattern that matches nothing is an error that suggests close paths: a silent miss is the
worst outcome for someone who typed ``transformer.h.*.atn``.

Hook points (identity modules that only name a tensor, such as the bundled GPT-2's
``attn.att``) are matched by a glob only when its last part names them without wildcards:
``transformer.h.*.attn.att`` finds the attention patterns, while ``*`` and ``*.attn.*`` keep
meaning the model's real layers.

A module can be reachable under several paths: a tied projection registered as a child of two
parents (``generator.proj`` is ``mlm.decoder``), embeddings shared by an encoder and a decoder,
a block list aliased as ``blocks`` and ``layers``. torch's ``named_modules()`` lists such a
module once, under its first path. Here a pattern that matches *any* of its paths selects it,
once (it runs once per call, so it is observed once per call), under the first path the
pattern matched: ``mlm.decoder`` for the pattern ``"mlm.*"``, ``generator.proj`` for ``"*"``.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn

from torchlens_edu._core.formatting import did_you_mean

Pattern = str | Callable[[str, nn.Module], bool]


class PatternError(ValueError):
    """A module-path pattern matched no module of the model."""


def match_modules(model: nn.Module, pattern: Pattern, *, required: bool = True
                  ) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` pairs whose path matches ``pattern``, in model order.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> [p for p, _ in match_modules(m, "0")]
    ['0']
    >>> [p for p, _ in match_modules(nn.DataParallel(m), "0")]  # also DDP: paths inside it
    ['module.0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    named = every_path(model)  # a shared module once per path it is reachable under
    if isinstance(pattern, nn.Module):  # callable, but not a (path, module) -> bool test
        paths = [repr(path) for path, module in named if module is pattern]
        where = (f"it is at {' and '.join(paths)} in this model: pass that path" if paths else
                 "it is not part of this model either")
        raise TypeError(f"a module pattern is a path such as 'transformer.h.*.attn' or a "
                        f"function (path, module) -> bool, not the {type(pattern).__name__} "
                        f"module itself; {where}")
    if callable(pattern):
        hits = [(path, module) for path, module in named if pattern(path, module)]
    elif isinstance(pattern, str):
        names_points = not _WILDCARDS.intersection(pattern.rsplit(".", 1)[-1])
        wrapped = _WRAPPED if isinstance(model, _WRAPPERS) else None
        hits = [(path, module) for path, module in named
                if (fnmatch.fnmatchcase(path, pattern)
                    or (wrapped and path.startswith(wrapped)
                        and fnmatch.fnmatchcase(path.removeprefix(wrapped), pattern)))
                and (names_points or not is_hook_point(module))]
    else:
        raise TypeError(f"a module pattern is a glob string such as 'transformer.h.*.attn' or a "
                        f"function (path, module) -> bool, not {type(pattern).__name__}")
    if required and not hits:
        raise PatternError(_no_match_message(pattern, [path for path, _ in named]))
    # each module once, under the first of its paths that matched (hits are in model order)
    first: dict[nn.Module, str] = {}
    for path, module in hits:
        first.setdefault(module, path)
    return [(path, module) for module, path in first.items()]


def require_module(obj: Any, who: str) -> nn.Module:
    """``obj`` if it is an ``nn.Module``, else a TypeError that says what to pass instead
    (``who`` is the call, as the user wrote it: ``"inspect()"``).

    >>> require_module(nn.Linear(2, 2), "inspect()")
    Linear(in_features=2, out_features=2, bias=True)
    >>> require_module("gpt2", "inspect()")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: inspect() needs a torch.nn.Module, got str: this is a name: load the model first...
    """
    if isinstance(obj, nn.Module):
        return obj
    kind = type(obj).__name__
    if isinstance(getattr(obj, "model", None), nn.Module):  # HF pipeline, wrappers, trainers
        hint = (f"it wraps one: pass its .model (e.g. {who.rstrip('()')}(pipe.model) for a "
                "Hugging Face pipeline)")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = ("this looks like a state dict (names -> tensors): build the model first, then "
                "model.load_state_dict(state_dict), and pass the model")
    elif isinstance(obj, torch.Tensor):
        hint = "this is a tensor: pass the model that produces or consumes it"
    elif isinstance(obj, str):
        hint = ("this is a name: load the model first, e.g. "
                "GPT2.from_pretrained('gpt2') from torchlens_edu.models")
    elif isinstance(obj, type) and issubclass(obj, nn.Module):
        hint = (f"this is the class {obj.__name__}, not a model: build one first, e.g. "
                f"model = {obj.__name__}(...), and pass the model")
    elif callable(obj):
        hint = ("this is a function: pass the nn.Module it calls, or wrap the function in an "
                "nn.Module whose forward calls it")
    else:
        hint = "pass the model object itself (an instance of a torch.nn.Module subclass)"
    raise TypeError(f"{who} needs a torch.nn.Module, got {kind}: {hint}")


def every_path(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every path of every module, in model order: a module registered
    under two parents comes twice (torch's ``named_modules()`` lists it once). A module that
    contains itself (a cycle) is not followed into again.

    >>> lin = nn.Linear(2, 2)
    >>> tied = nn.ModuleDict({"enc": lin, "dec": lin})
    >>> [path for path, _ in every_path(tied)], [path for path, _ in tied.named_modules()]
    (['', 'enc', 'dec'], ['', 'enc'])
    """
    found: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()  # modules on the way down to here: a cycle stops

    def visit(module: nn.Module, path: str) -> None:
        found.append((path, module))
        inside.add(id(module))
        for name, child in module._modules.items():
            if child is not None and id(child) not in inside:
                visit(child, f"{path}.{name}" if path else name)
        inside.discard(id(module))

    visit(model, "")
    return found


def module_aliases(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Module -> every dotted path it is reachable under, the first (torch's) first; only the
    modules with more than one path.

    >>> lin = nn.Linear(2, 2)
    >>> module_aliases(nn.ModuleDict({"enc": lin, "dec": lin}))[lin]
    ['enc', 'dec']
    """
    paths: dict[nn.Module, list[str]] = {}
    for path, module in every_path(model):
        paths.setdefault(module, []).append(path)
    return {module: found for module, found in paths.items() if len(found) > 1}


def also_reachable(paths: list[str], shown: str) -> str:
    """``"also reachable as mlm.decoder"``: the other paths of a module shown as ``shown``
    (``""`` when it has no other).

    >>> also_reachable(["generator.proj", "mlm.decoder"], "generator.proj")
    'also reachable as mlm.decoder'
    """
    others = [path or "<model>" for path in paths if path != shown]
    return f"also reachable as {', '.join(others)}" if others else ""


def is_hook_point(module: nn.Module) -> bool:
    """True for an identity module that exists to be observed (``is_hook_point = True`` on its
    class, as on ``torchlens_edu.models.hook_points.HookPoint``): summaries, traces and
    wildcard patterns leave these out.

    >>> is_hook_point(nn.Identity())
    False
    """
    return getattr(type(module), "is_hook_point", False) is True


_WILDCARDS = frozenset("*?[")
# DistributedDataParallel and DataParallel hold the user's model as `.module`: its paths gain
# a "module." prefix that the user never wrote. A pattern matches with or without it (the
# matched path returned is the real one, in the wrapper).
_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)
_WRAPPED = "module."


def _no_match_message(pattern: Pattern, paths: list[str]) -> str:
    if callable(pattern):
        return "the module predicate matched no module of the model"
    named = [p for p in paths if p and p != pattern]  # every path, aliases too; never itself
    hint = did_you_mean(pattern, named, n=5, cutoff=0.5, quote=False, start=True)
    if not hint:  # globs rarely look like paths letter for letter: compare their last parts
        tail = pattern.rsplit(".", 1)[-1].strip("*")
        close = sorted({p for p in named if tail and tail in p})[:5]
        hint = f"Did you mean {', '.join(close)}?" if close else ""
    hint = f" {hint}" if hint else ""
    sample = ", ".join(p for p in paths[1:8] if p)
    return (f"pattern {pattern!r} matches no module of the model.{hint} "
            f"Module paths look like: {sample}{' ...' if len(paths) > 8 else ''}")


def module_paths(model: nn.Module) -> dict[nn.Module, str]:
    """Module -> its (first) dotted path in ``model``; the root is ``""``."""
    paths: dict[nn.Module, str] = {}
    for path, module in model.named_modules():
        paths.setdefault(module, path)
    return paths


def uses_fsdp(model: nn.Module) -> bool:
    """True when FSDP2 (``fully_shard``) manages a module of ``model``.

    Read from ``sys.modules``: a model can only be sharded once the program imported FSDP, and
    importing it here, from several threads at once, could meet a half-imported module.

    >>> uses_fsdp(nn.Linear(2, 2))
    False
    """
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def is_compiled(module: nn.Module) -> bool:
    """True for what ``torch.compile(model)`` returns (an ``OptimizedModule``). Read from
    ``sys.modules``: only a program that compiled something has imported TorchDynamo.

    >>> is_compiled(nn.Linear(2, 2))
    False
    """
    compiled_type = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    return compiled_type is not None and isinstance(module, compiled_type)


def eager_original(model: nn.Module) -> nn.Module:
    """The eager model under ``torch.compile``'s wrapper (``model._orig_mod``), else ``model``:
    a forward the toolkit runs to look inside runs it, with the same modules and ops, instead
    of code TorchDynamo would compile with the observers' hooks in it.

    >>> eager_original(nn.Linear(2, 2))
    Linear(in_features=2, out_features=2, bias=True)
    """
    while is_compiled(model):
        model = cast(nn.Module, model._orig_mod)
    return model

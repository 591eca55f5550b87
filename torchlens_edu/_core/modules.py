"""Find modules by their path in the model (``transformer.h.3.attn``) with glob patterns.

Patterns are ``fnmatch`` globs over dotted paths (``transformer.h.*.attn``, ``*.mlp``,
``lm_head``) or predicates ``(path, module) -> bool``. The root module's path is ``""``.
A pattern that matches nothing is an error that suggests close paths: a silent miss is the
worst outcome for someone who typed ``transformer.h.*.atn``.

Hook points (identity modules that only name a tensor, such as the bundled GPT-2's
``attn.att``) are matched by a glob only when its last part names them without wildcards:
``transformer.h.*.attn.att`` finds the attention patterns, while ``*`` and ``*.attn.*`` keep
meaning the model's real layers.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable

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
    named = list(model.named_modules())  # shared submodules appear once, under their first path
    if callable(pattern):
        found = [(path, module) for path, module in named if pattern(path, module)]
    elif isinstance(pattern, str):
        names_points = not _WILDCARDS.intersection(pattern.rsplit(".", 1)[-1])
        wrapped = _WRAPPED if isinstance(model, _WRAPPERS) else None
        found = [(path, module) for path, module in named
                 if (fnmatch.fnmatchcase(path, pattern)
                     or (wrapped and path.startswith(wrapped)
                         and fnmatch.fnmatchcase(path.removeprefix(wrapped), pattern)))
                 and (names_points or not is_hook_point(module))]
    else:
        raise TypeError(f"a module pattern is a glob string such as 'transformer.h.*.attn' or a "
                        f"function (path, module) -> bool, not {type(pattern).__name__}")
    if required and not found:
        raise PatternError(_no_match_message(pattern, [path for path, _ in named]))
    return found


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
    named = [p for p in paths if p]
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

"""Hook points: identity modules that name a tensor inside a forward, so that it can be observed.

``att = self.att(softmax(...))`` changes nothing, but ``attn.att`` is now a module: ordinary
module hooks see (and may replace) the attention pattern there, as with TransformerLens'
``HookPoint``. A hook point holds no parameters or buffers, so state dicts stay as they were.

Whether to take the slow, observable path is decided by :func:`observed`: a hook on a point, a
global module hook, a tracer or debugger (``sys.gettrace()``, ``sys.monitoring``) or an op-level
``TorchFunctionMode`` means someone may look. Nothing here knows who is looking.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.modules import module as _module
from torch.utils._device import DeviceContext


class HookPoint(nn.Identity):
    """Returns its input; exists so that module hooks can see a tensor by its path.

    Tools that list modules may leave hook points out (``is_hook_point`` says what they are).

    >>> point = HookPoint()
    >>> handle = point.register_forward_hook(lambda module, args, out: out * 2)
    >>> point(torch.ones(2))
    tensor([2., 2.])
    >>> handle.remove()
    """

    is_hook_point: ClassVar[bool] = True


def observed(points: Iterable[nn.Module]) -> bool:
    """True when something may look at ``points`` or step through the code around them.

    >>> observed([HookPoint()])
    False
    """
    # this runs in every attention forward: cheap checks, no allocation
    if sys.gettrace() is not None or _debugger_tool_active() or _function_mode_active():
        return True
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return True
    for p in points:
        if p._forward_hooks or p._forward_pre_hooks or p._backward_hooks or p._backward_pre_hooks:
            return True
    return False


_monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12


def _debugger_tool_active() -> bool:
    """Python >= 3.12 debuggers (debugpy too) may trace with ``sys.monitoring``, not settrace."""
    return _monitoring is not None and _monitoring.get_tool(_monitoring.DEBUGGER_ID) is not None


def _function_mode_active() -> bool:
    """An op-level observer (a ``TorchFunctionMode``) is on. Two kinds of mode watch nothing:
    ``with torch.device(...)`` / ``torch.set_default_device`` (a ``DeviceContext``), and a mode
    that only measures and says so with ``observes_ops = False`` (a shape-only run that
    predicts the cost of the real one must take the real one's path)."""
    if not torch._C._is_torch_function_mode_enabled():
        return False
    stack = torch.overrides._get_current_function_mode_stack()
    return any(not isinstance(mode, DeviceContext) and getattr(mode, "observes_ops", True)
               for mode in stack)

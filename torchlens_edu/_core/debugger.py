"""Is an IDE debugger attached? One answer for the stop points and the NaN watch."""

from __future__ import annotations

import sys


def debugger_attached() -> bool:
    """True when an IDE debugger (debugpy / VS Code) is connected to this process.

    Never imports debugpy just to ask: a program that did not load it has no client.

    >>> debugger_attached()
    False
    """
    debugpy = sys.modules.get("debugpy")
    return bool(debugpy is not None and "pydevd" in sys.modules and debugpy.is_client_connected())

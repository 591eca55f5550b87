"""The one place where torchlens_edu decides how to talk to the user.

Every user-visible output goes through rich. A fresh Console per call picks up the current
terminal, Jupyter, ``NO_COLOR`` and non-TTY state (rich reads those when a Console is made).
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console


def get_console(*, stderr: bool = False) -> Console:
    """A rich Console for the current environment (terminal, Jupyter, plain pipe)."""
    return Console(stderr=stderr, highlight=False)


def render_text(renderable: Any, *, width: int = 100) -> str:
    """Render a rich object to plain text, e.g. for ``__repr__`` or ``__str__``."""
    console = Console(width=width, no_color=True, color_system=None, highlight=False,
                      force_terminal=False, force_jupyter=False)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get().rstrip("\n")


_HTML_FORMAT = '<pre style="font-family:monospace;line-height:1.2">{code}</pre>'


def render_html(renderable: Any, *, width: int = 100) -> str:
    """Render a rich object to an HTML fragment, for ``_repr_html_`` in Jupyter."""
    # only the record is wanted: what the console writes goes to a throwaway buffer
    console = Console(record=True, width=width, force_terminal=True, force_jupyter=False,
                      color_system="truecolor", highlight=False, file=io.StringIO())
    console.print(renderable)
    return console.export_html(inline_styles=True, code_format=_HTML_FORMAT)


"""Where a line of source is, as a report names it: ``file.py:LINE``."""

from __future__ import annotations

import os


def line_of(text: str, path: str) -> str:
    """``file.py:LINE`` of the first line of the file at ``path`` that contains ``text``."""
    with open(path) as source:
        for number, line in enumerate(source, start=1):
            if text in line:
                return f"{os.path.basename(path)}:{number}"
    raise LookupError(text)

"""Progress on stderr, through rich, and only while something slow really happens.

Loading the embedded model takes milliseconds: a bar that appears and vanishes again is noise
(in a terminal it leaves a blank line, in Jupyter it is one more output). So a bar starts only
once the work has lasted ``show_after_s``; a download starts it at once. In Jupyter, rich can
redraw a bar only through ipywidgets; without it there is no bar at all (rich would warn).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SHOW_AFTER_S = 1.0  # quicker than this (a human barely notices), and no bar is drawn


@contextmanager
def progress(description: str, *, enabled: bool = True, show_after_s: float = SHOW_AFTER_S
             ) -> Iterator[Callable[..., None]]:
    """A transient bar on stderr, as ``advance()``; ``advance(total=n)`` sizes it. It is drawn
    once the block has lasted ``show_after_s`` (checked at each ``advance``), never before.

    >>> with progress("loading weights") as advance:
    ...     advance(total=2); advance(); advance()
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True, highlight=False)  # models/ uses no toolkit helper
    drawable = not console.is_jupyter or importlib.util.find_spec("ipywidgets") is not None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   console=console, transient=True, disable=not (enabled and drawable))
    task = bar.add_task(description, total=None)
    start = time.monotonic()

    def show_if_slow() -> None:
        if not bar.live.is_started and time.monotonic() - start >= show_after_s:
            bar.start()

    def advance(total: int | None = None) -> None:
        if total is not None:
            bar.update(task, total=total)
        else:
            bar.advance(task)
        show_if_slow()

    show_if_slow()
    try:
        yield advance
    finally:
        if bar.live.is_started:
            bar.stop()

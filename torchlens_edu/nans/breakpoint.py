"""``watch_nans(mode="break")``: stop in the debugger at the line that made the NaN.

The line ran long ago, so we replay the failing step up to the producing call and stop there,
with the same locals: live in an attached debugpy client (VS Code), or in pdb's post-mortem on
the replay's traceback cut at the user's frame. Without a terminal nobody could answer pdb, so
we say so and let the error be raised instead of hanging.
"""

from __future__ import annotations

import pdb
import sys
from collections.abc import Callable
from types import FrameType, TracebackType

from torchlens_edu._core.console import get_console
from torchlens_edu._core.debugger import debugger_attached
from torchlens_edu.nans.report import NonFiniteReport

# (index of the call to stop at, what to run in the user's frame there) -> the stop, if reached
ReplayTo = Callable[[int, Callable[[FrameType | None], None] | None], BaseException | None]


def stop_at_producer(report: NonFiniteReport, index: int | None, replay_to: ReplayTo, *,
                     refused: str = "") -> None:
    """Open the debugger at the producing call of ``report`` (call ``index`` of the replay);
    ``refused``: why no replay may run here (it is said, and the error raised instead).

    >>> report = NonFiniteReport(phase="input", module="", op="", kind="nan", source="", hint="h",
    ...                          cause="input")
    >>> stop_at_producer(report, None, lambda index, on_stop: None)  # nothing to stop at
    """
    console = get_console(stderr=True)
    if refused and index is not None and index >= 0:
        console.print(f"[yellow]watch_nans(mode='break'):[/] no debugger stop at "
                      f"{report.source}: {refused}; raising NonFiniteError")
        return
    if index is None or index < 0:
        console.print(f"[yellow]watch_nans(mode='break'):[/] no line of the model to stop at "
                      f"({report.cause}); raising NonFiniteError")
        return
    debugger = debugger_attached()
    if not debugger and not (sys.stdin is not None and sys.stdin.isatty()):
        console.print("[yellow]watch_nans(mode='break'):[/] stdin is not interactive, so no "
                      "debugger can open here; raising NonFiniteError instead")
        return
    console.print(report)
    console.print(f"[bold]Stopping at {report.source}[/] in a replay of the failing step: the "
                  "locals are the values that made the non-finite result. Continue (c) to raise "
                  "NonFiniteError.")
    stopped = replay_to(index, debugpy_stop if debugger else None)
    if stopped is not None and not debugger:
        pdb.post_mortem(trim(stopped.__traceback__, getattr(stopped, "frame", None)))


def debugpy_stop(frame: FrameType | None) -> None:
    """Pause the attached debugpy client in ``frame`` (the user's line), live."""
    from debugpy.server import api

    # what debugpy.breakpoint() does for its caller's frame, for the user's frame instead
    api._settrace(suspend=True, trace_only_current_thread=True, patch_multiprocessing=False,
                  stop_at_frame=frame)


def trim(tb: TracebackType | None, frame: FrameType | None) -> TracebackType | None:
    """Cut the traceback after ``frame`` so that pdb opens in the user's line, not in ours."""
    node = tb
    while node is not None:
        if node.tb_frame is frame:
            node.tb_next = None
            break
        node = node.tb_next
    return tb

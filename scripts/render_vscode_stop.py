"""Render what VS Code shows at the attention stop, for the README: docs/images/vscode_stop.svg.

Not a mock-up: it runs the shipped "GPT-2: stop inside attention (CPU)" configuration through
debugpy (the same headless DAP client as tests/test_vscode_dap.py), then draws the source
around the stop, the Variables pane (locals as the debugger reports them), the call stack and
a Debug Console exchange with rich.

    python scripts/render_vscode_stop.py [--out docs/images/vscode_stop.svg]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from rich.console import Console, Group
from rich.layout import Layout
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the DAP client lives with the tests that use it

from support.dap_client import DAPClient, as_vscode_would, shipped_configuration, substitute  # noqa: E402

LOCALS = ("q", "k", "v", "scores", "att", "mask", "B", "T", "C", "nh", "hs", "past")
CONSOLE = ("q.shape", "att[0, 0, :6, :6]", "att.sum(-1)[0, 0, :4]")


def capture() -> dict:
    """Run the CPU configuration to its stop and read what the debugger shows there."""
    config = shipped_configuration("attention (CPU)")
    with tempfile.TemporaryDirectory() as workspace:
        launch = as_vscode_would(substitute(config, {"workspaceFolder": workspace}), workspace)
        with DAPClient.launch_adapter() as dap:
            dap.initialize()
            dap.start(launch)
            thread, frame = dap.stopped()
            stack = dap.request("stackTrace", {"threadId": thread, "levels": 40})["stackFrames"]
            local = dap.locals(frame["id"])
            answers = [(e, dap.evaluate(e, frame["id"])) for e in CONSOLE]
            dap.request("continue", {"threadId": thread})
            dap.event("exited")
    return {"config": config["name"], "frame": frame, "stack": stack, "locals": local,
            "console": answers}


def render(seen: dict, out: Path) -> None:
    frame = seen["frame"]
    path = Path(frame["source"]["path"])
    line = frame["line"]
    code = Syntax(path.read_text(), "python", line_numbers=True, line_range=(line - 9, line + 2),
                  highlight_lines={line}, theme="github-dark", word_wrap=False)
    variables = Table.grid(padding=(0, 1))
    variables.add_column(style="bold #9cdcfe", no_wrap=True)
    variables.add_column(overflow="fold")
    for name in LOCALS:
        if name in seen["locals"]:
            variables.add_row(name, seen["locals"][name]["value"])
    stack = Table.grid()
    for f in [f for f in seen["stack"] if "site-packages" not in f["source"].get("path", "")][:5]:
        where = f"{Path(f['source'].get('path', '?')).name}:{f['line']}"
        stack.add_row(Text(f"{f['name']}  ", style="bold"), Text(where, style="dim"))
    console_lines = Text()
    for expression, answer in seen["console"]:
        console_lines.append(f"> {expression}\n", style="bold #9cdcfe")
        console_lines.append(f"{answer}\n")

    layout = Layout()
    layout.split_row(Layout(name="left", ratio=4), Layout(name="right", ratio=7))
    layout["left"].split_column(
        Layout(Panel(variables, title="VARIABLES · Locals", title_align="left",
                     border_style="#3c3c3c"), size=15),
        Layout(Panel(stack, title="CALL STACK", title_align="left", border_style="#3c3c3c")))
    layout["right"].split_column(
        Layout(Panel(code, title=f"{path.name} — paused (F10 steps, F5 continues)",
                     title_align="left", border_style="#d7ba7d"), size=15),
        Layout(Panel(console_lines, title="DEBUG CONSOLE", title_align="left",
                     border_style="#3c3c3c")))
    console = Console(record=True, width=172, height=31, force_terminal=True,
                      color_system="truecolor", file=io.StringIO())  # only the record is kept
    console.print(Group(Text(f"▶ {seen['config']}", style="bold #4ec9b0"), layout))
    out.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(out), title="VS Code · torchlens_edu: stopped inside attention")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "vscode_stop.svg")
    args = parser.parse_args()
    render(capture(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``torchlens-edu vscode init [DIR]``: put torchlens_edu's launch configurations into a workspace.

Writes ``DIR/.vscode/launch.json`` and ``settings.json`` from the copies shipped inside the
package. An existing file (comments and trailing commas welcome) is merged, not replaced: your
configurations, inputs and settings stay; ours are added next to them. A configuration of ours
that you changed is kept as you wrote it unless ``--force``. Running it twice changes nothing.

>>> from torchlens_edu.cli import main
>>> main(["vscode", "init", ".", "--dry-run"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

DESCRIPTION = ("Put torchlens_edu's launch configurations into a workspace: writes "
               "DIR/.vscode/launch.json and settings.json from the copies shipped inside the "
               "package. An existing file (comments and trailing commas welcome) is edited, not "
               "replaced: your configurations, inputs, settings and comments stay; ours are added "
               "next to them. A configuration of ours that you changed is kept as you wrote it "
               "unless --force (then yours is saved first as launch.json.bak). Running it twice "
               "changes nothing.")


def register(subparsers: Any) -> None:
    """Add the ``vscode`` subcommand to the ``torchlens-edu`` parser."""
    p = subparsers.add_parser("vscode", help="VS Code launch configurations (vscode init)",
                              description="Set up VS Code to step through models with "
                                          "torchlens_edu.")
    actions = p.add_subparsers(dest="vscode_command", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="write or merge .vscode/launch.json and settings.json",
                              description=DESCRIPTION)
    init.add_argument("dir", nargs="?", default=".", metavar="DIR",
                      help="the workspace folder (default: the current folder)")
    init.add_argument("--force", action="store_true",
                      help="replace configurations / settings of ours that were changed, and "
                           "start afresh from a file that cannot be read (saved as *.bak)")
    init.add_argument("--dry-run", action="store_true", help="say what would change; write nothing")
    init.set_defaults(func=run)


@dataclass
class Plan:
    """What ``init`` does to one file: its new text and one line per decision."""

    path: Path
    old: str | None
    new: str
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.old != self.new


def template(name: str) -> str:
    """The shipped ``launch.json`` / ``settings.json`` text.

    >>> '"GPT-2: stop inside attention (CPU)"' in template("launch.json")
    True
    """
    return resources.files("torchlens_edu").joinpath("data", "vscode", name).read_text("utf-8")


def plan_launch(path: Path, old: str | None, *, force: bool) -> Plan:
    """Merge the shipped launch configurations (by ``name``) and inputs (by ``id``) into ``old``."""
    return _plan(path, old, "launch.json", force, _merge_launch)


def plan_settings(path: Path, old: str | None, *, force: bool) -> Plan:
    """Merge the shipped settings (by key) into ``old``; keys you set keep your value."""
    return _plan(path, old, "settings.json", force, _merge_settings)


Merge = Callable[[Any, dict[str, Any], str, bool], tuple[list[Any], list[str]]]


def _plan(path: Path, old: str | None, name: str, force: bool, merge: Merge) -> Plan:
    """Write ours where there is no file; else merge ours into the user's text, in place."""
    from torchlens_edu._core import jsonc as _jsonc

    ours_text = template(name)
    if old is None:
        return Plan(path, None, ours_text, ["written"])
    root = _read_root(path, old, force)
    if root is None:
        return Plan(path, old, ours_text, [f"could not be read: started afresh "
                                           f"(yours saved as {path.name}.bak)"])
    try:
        edits, notes = merge(root, _jsonc.parse(ours_text).plain(), old, force)
    except ValueError as err:  # say which file
        raise ValueError(f"{path}: {err}") from None
    return Plan(path, old, _jsonc.apply(old, edits), notes or ["already up to date"])


def _merge_launch(root: Any, ours: dict[str, Any], old: str, force: bool
                  ) -> tuple[list[Any], list[str]]:
    from torchlens_edu._core import jsonc as _jsonc

    edits: list[_jsonc.Edit] = []
    notes: list[str] = []
    missing: dict[str, Any] = {}
    if "version" not in root.members:
        missing["version"] = ours["version"]
    for key, ident in (("configurations", "name"), ("inputs", "id")):
        array = root.members.get(key)
        if array is None:
            missing[key] = ours[key]
            notes += [f"added {key[:-1]} {item[ident]!r}" for item in ours[key]]
            continue
        if array.kind != "array":
            raise ValueError(f"\"{key}\" should be a list [...]; fix it or use --force")
        theirs = {item.plain().get(ident): item for item in array.items
                  if item.kind == "object"}
        new_items = []
        for item in ours[key]:
            mine = theirs.get(item[ident])
            if mine is None:
                new_items.append(item)
                notes.append(f"added {key[:-1]} {item[ident]!r}")
            elif mine.plain() != item:
                if force:
                    edits.append(_jsonc.replace(mine, item, old))
                    notes.append(f"replaced {key[:-1]} {item[ident]!r} (--force)")
                else:
                    notes.append(f"kept your {key[:-1]} {item[ident]!r} (it differs from ours; "
                                 "--force replaces it)")
        edits += _jsonc.add_items(old, array, new_items)
    edits += _jsonc.add_members(old, root, missing)
    return edits, notes


def _merge_settings(root: Any, ours: dict[str, Any], old: str, force: bool
                    ) -> tuple[list[Any], list[str]]:
    from torchlens_edu._core import jsonc as _jsonc

    edits: list[_jsonc.Edit] = []
    notes: list[str] = []
    for key, value in ours.items():
        mine = root.members.get(key)
        if mine is not None and mine.plain() != value:
            if force:
                edits.append(_jsonc.replace(mine, value, old))
                notes.append(f"replaced setting {key!r} (--force)")
            else:
                notes.append(f"kept your setting {key!r} = {mine.plain()!r}")
    missing = {k: v for k, v in ours.items() if k not in root.members}
    notes += [f"added setting {k!r}" for k in missing]
    edits += _jsonc.add_members(old, root, missing)
    return edits, notes


def _read_root(path: Path, text: str, force: bool) -> Any:
    """The parsed top-level object, or None when unreadable and ``force`` says start afresh."""
    from torchlens_edu._core import jsonc as _jsonc

    try:
        root = _jsonc.parse(text) if text.strip() else _jsonc.parse("{}")
    except _jsonc.JSONCError as err:
        if force:
            return None
        raise ValueError(f"{path} is not valid JSON with comments ({err}); fix it, or use "
                         "--force to start afresh (your file is kept as .bak)") from err
    if root.kind != "object":
        if force:
            return None
        raise ValueError(f"{path} should hold one object {{...}}; fix it or use --force")
    return root


def init(workspace: str | os.PathLike, *, force: bool = False, dry_run: bool = False
         ) -> list[Plan]:
    """Write (or merge) ``.vscode/launch.json`` and ``settings.json`` under ``workspace``.

    >>> plans = init("my_project", dry_run=True)  # doctest: +SKIP
    """
    folder = Path(workspace)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; give the folder you open in VS Code")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder; give the folder you open "
                                 "in VS Code")
    target = folder / ".vscode"
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file, so VS Code's settings folder cannot be "
                                 "created there; move it away")
    plans = []
    for name, planner in (("launch.json", plan_launch), ("settings.json", plan_settings)):
        path = target / name
        old = path.read_text("utf-8") if path.exists() else None
        if old is not None and old.startswith("\ufeff"):
            old = old[1:]  # a byte-order mark some editors write
        plans.append(planner(path, old, force=force))
    if not dry_run:
        for plan in plans:
            if plan.changed:
                _write(plan)
    return plans


def _write(plan: Plan) -> None:
    plan.path.parent.mkdir(exist_ok=True)
    if plan.old is not None and any("started afresh" in note for note in plan.notes):
        plan.path.with_name(plan.path.name + ".bak").write_text(plan.old, "utf-8")
    # write next to the target, then rename: an interrupted write never leaves half a file
    fd, tmp = tempfile.mkstemp(dir=plan.path.parent, prefix=plan.path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(plan.new)
        os.replace(tmp, plan.path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    """``torchlens-edu vscode init``; returns the exit code."""
    from rich.text import Text

    from torchlens_edu._core.console import get_console

    console = get_console()
    try:
        plans = init(args.dir, force=args.force, dry_run=args.dry_run)
    except (OSError, ValueError) as err:
        message = str(err)
        if isinstance(err, PermissionError) or getattr(err, "errno", None) in (13, 30):
            message = (f"cannot write to {err.filename or args.dir} ({err.strerror}): choose a "
                       "workspace folder you can write to, or fix its permissions")
        error = Text.assemble(("error: ", "bold red"), message)
        get_console(stderr=True).print(error, soft_wrap=True)
        return 1
    verb = "would write" if args.dry_run else "wrote"
    for plan in plans:
        state = f"{verb} {plan.path}" if plan.changed else f"{plan.path} unchanged"
        console.print(Text(state, style="bold"))
        for note in plan.notes:
            console.print(Text("  • " + note))
    if not args.dry_run:
        console.print(Text("In VS Code: Run and Debug (Ctrl+Shift+D), pick "
                           "'GPT-2: stop inside attention (CPU)', press F5."))
    return 0

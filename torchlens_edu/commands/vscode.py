"""``torchlens-edu vscode init [DIR]``: put torchlens_edu's launch configurations into a workspace.

Writes ``DIR/.vscode/launch.json`` and ``settings.json`` from the copies shipped inside the
package. An existing file (comments and trailing commas welcome) is edited, never destroyed: your
configurations, inputs, settings, comments and indentation stay; ours are added next to them,
with their comments, in your file's indentation style. A configuration of ours that you changed
is kept as you wrote it unless ``--force``, which saves your file first, byte for byte, as
``launch.json.bak`` (``.bak.1``, ... : a backup is never overwritten). Links are followed,
read-only files refused, mode, BOM and CRLF kept (see ``_files``). Running it twice changes
nothing.

>>> from torchlens_edu.cli import main
>>> main(["vscode", "init", ".", "--dry-run"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torchlens_edu._core import jsonc as _jsonc
from torchlens_edu.commands import CommandError, _files
from torchlens_edu.commands._files import TextFile

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
                           "start afresh from a file that cannot be read (the file is saved "
                           "first as NAME.bak, or NAME.bak.1, ... if that exists)")
    init.add_argument("--dry-run", action="store_true", help="say what would change; write nothing")
    init.set_defaults(func=run)


@dataclass(kw_only=True)
class Plan:
    """What ``init`` does to one file: its new text, the backup it makes first, and one line
    per decision. ``old`` is None where there is no file yet."""

    path: Path
    old: TextFile | None
    new: str
    notes: list[str] = field(default_factory=list)
    backup: Path | None = None  # where the old bytes are saved before writing (NAME.bak.N)

    @property
    def changed(self) -> bool:
        return self.old is None or self.old.text != self.new or not self.old.utf8


def template(name: str) -> str:
    """The shipped ``launch.json`` / ``settings.json`` text.

    >>> '"GPT-2: stop inside attention (CPU)"' in template("launch.json")
    True
    """
    folder = resources.files("torchlens_edu").joinpath("data").joinpath("vscode")
    return folder.joinpath(name).read_text("utf-8")


def printable(name: str, width: int) -> str:
    """The shipped file wrapped to ``width`` columns and still valid JSONC (every comment line
    starts with ``//``, no string is cut), so that what a terminal shows can be copied.

    >>> lines = printable("launch.json", 60).splitlines()
    >>> all(len(line) <= 60 for line in lines if line.lstrip().startswith("//"))
    True
    """
    return _jsonc.wrap(template(name), width)


def plan_launch(path: Path, old: TextFile | None, *, force: bool) -> Plan:
    """Merge the shipped launch configurations (by ``name``) and inputs (by ``id``) into ``old``."""
    return _plan(path, old, "launch.json", force, _merge_launch)


def plan_settings(path: Path, old: TextFile | None, *, force: bool) -> Plan:
    """Merge the shipped settings (by key) into ``old``; keys you set keep your value."""
    return _plan(path, old, "settings.json", force, _merge_settings)


@dataclass(kw_only=True)
class _Merge:
    """One merge in progress: the user's text and ours, and what it has decided so far."""

    old: str
    root: _jsonc.Node
    ours_text: str
    ours: _jsonc.Node
    force: bool
    backup_name: str
    edits: list[_jsonc.Edit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    replaced: bool = False  # something of the user's is replaced: back the file up first

    def __post_init__(self) -> None:
        self.unit = _jsonc.indent_unit(self.old, self.root)  # the user's indentation style
        self.ours_unit = _jsonc.indent_unit(self.ours_text, self.ours)

    def snippet(self, node: _jsonc.Node) -> _jsonc.Snippet:
        """One of our values with its comments, in the user's indentation style."""
        return _jsonc.snippet(self.ours_text, node, unit=self.unit, source_unit=self.ours_unit)

    def replace(self, mine: _jsonc.Node, ours: _jsonc.Node, what: str) -> None:
        self.edits.append(_jsonc.replace(mine, self.snippet(ours), self.old))
        self.notes.append(f"replaced {what} (--force; yours is saved in {self.backup_name})")
        self.replaced = True


Merge = Callable[[_Merge], None]


def _plan(path: Path, old: TextFile | None, name: str, force: bool, merge: Merge) -> Plan:
    """Write ours where there is no file; else merge ours into the user's text, in place."""
    ours_text = template(name)
    if old is None:
        return Plan(path=path, old=None, new=ours_text, notes=["written"])
    if not old.text.strip() and old.utf8:
        return Plan(path=path, old=old, new=ours_text, notes=["was empty: written"])
    backup = _files.free_backup_name(path)
    root = _read_root(path, old, force)
    if root is None:
        return Plan(path=path, old=old, new=ours_text, backup=backup, notes=[
            f"could not be read: started afresh (yours is saved in {backup.name})"])
    state = _Merge(old=old.text, root=root, ours_text=ours_text, ours=_jsonc.parse(ours_text),
                   force=force, backup_name=backup.name)
    try:
        merge(state)
    except ValueError as err:  # say which file
        raise ValueError(f"{path}: {err}") from None
    return Plan(path=path, old=old, new=_jsonc.apply(old.text, state.edits),
                notes=state.notes or ["already up to date"],
                backup=backup if state.replaced else None)


def _merge_launch(m: _Merge) -> None:
    missing: dict[str, _jsonc.Snippet] = {}
    if "version" not in m.root.members:
        missing["version"] = m.snippet(m.ours.members["version"])
    for key, ident in (("configurations", "name"), ("inputs", "id")):
        ours = m.ours.members[key]
        array = m.root.members.get(key)
        if array is None:
            missing[key] = m.snippet(ours)
            m.notes += [f"added {key[:-1]} {item.plain()[ident]!r}" for item in ours.items]
            continue
        if array.kind != "array":
            if not m.force:
                raise ValueError(f'"{key}" should be a list [...]; fix it, or use --force to '
                                 f"replace it with ours (yours is saved in {m.backup_name})")
            m.replace(array, ours, f'"{key}" (it was not a list)')
            continue
        theirs = {item.plain().get(ident): item for item in array.items if item.kind == "object"}
        new_items = []
        for item in ours.items:
            label = f"{key[:-1]} {item.plain()[ident]!r}"
            mine = theirs.get(item.plain()[ident])
            if mine is None:
                new_items.append(m.snippet(item))
                m.notes.append(f"added {label}")
            elif mine.plain() != item.plain():
                if m.force:
                    m.replace(mine, item, f"your {label}")
                else:
                    m.notes.append(f"kept your {label} (it differs from ours; --force replaces "
                                   "it, saving yours first)")
        m.edits += _jsonc.add_items(m.old, array, new_items, unit=m.unit)
    m.edits += _jsonc.add_members(m.old, m.root, missing, unit=m.unit)


def _merge_settings(m: _Merge) -> None:
    missing: dict[str, _jsonc.Snippet] = {}
    for key, ours in m.ours.members.items():
        mine = m.root.members.get(key)
        if mine is None:
            missing[key] = m.snippet(ours)
            m.notes.append(f"added setting {key!r}")
        elif mine.plain() != ours.plain():
            if m.force:
                m.replace(mine, ours, f"your setting {key!r}")
            else:
                m.notes.append(f"kept your setting {key!r} = {mine.plain()!r}")
    m.edits += _jsonc.add_members(m.old, m.root, missing, unit=m.unit)


def _read_root(path: Path, old: TextFile, force: bool) -> _jsonc.Node | None:
    """The parsed top-level object, or None when unreadable and ``force`` says start afresh."""
    afresh = "use --force to start afresh from ours (yours is saved as a .bak file first)"
    try:
        if not old.utf8:
            raise _jsonc.JSONCError("it is not UTF-8 text")
        root = _jsonc.parse(old.text)
    except _jsonc.JSONCError as err:
        if force:
            return None
        raise ValueError(f"{path} is not valid JSON with comments ({err}); fix it, or "
                         f"{afresh}") from None
    if root.kind != "object":
        if force:
            return None
        raise ValueError(f"{path} should hold one object {{...}}; fix it, or {afresh}")
    return root


def init(workspace: str | os.PathLike, *, force: bool = False, dry_run: bool = False
         ) -> list[Plan]:
    """Write (or merge) ``.vscode/launch.json`` and ``settings.json`` under ``workspace``.

    Nothing is destroyed: a file is edited in place (through a symlink, keeping its mode, BOM
    and line ends), written atomically, and whatever of the user's is replaced (``force``) is
    first saved, byte for byte, as ``NAME.bak`` (``NAME.bak.1``, ... if that exists).

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
        plans.append(planner(path, _files.read(path), force=force))
    for plan in plans:  # refuse before writing anything
        if plan.changed and plan.old is not None:
            _files.check_writable(plan.old)
    if not dry_run:
        for plan in plans:
            if plan.changed:
                _write(plan)
    return plans


def _write(plan: Plan) -> None:
    if plan.old is None:
        _files.write(_files.target_of(plan.path), plan.new.encode("utf-8"))
        return
    if plan.backup is not None:
        saved = _files.save_backup(plan.path, plan.old.raw)
        if saved != plan.backup:  # another backup appeared since planning: name the real one
            plan.notes = [n.replace(plan.backup.name, saved.name) for n in plan.notes]
    _files.write(plan.old.target, plan.old.encode(plan.new), like=plan.old)


def run(args: argparse.Namespace) -> int:
    """``torchlens-edu vscode init``; returns the exit code."""
    from rich.text import Text

    from torchlens_edu._core.console import get_console

    console = get_console()
    try:
        plans = init(args.dir, force=args.force, dry_run=args.dry_run)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise  # cli.main says which file and what went wrong
        raise CommandError(f"cannot write to {err.filename or args.dir} ({err.strerror}): choose "
                           "a workspace folder you can write to, or fix its permissions") from None
    verb = "would write" if args.dry_run else "wrote"
    for plan in plans:
        state = f"{verb} {plan.path}" if plan.changed else f"{plan.path} unchanged"
        console.print(Text(state, style="bold"), soft_wrap=True)  # paths copy-paste whole
        for note in plan.notes:
            console.print(Text("  • " + note), soft_wrap=True)
    if not args.dry_run:
        console.print(Text("In VS Code: Run and Debug (Ctrl+Shift+D), pick "
                           "'GPT-2: stop inside attention (CPU)', press F5."))
    return 0

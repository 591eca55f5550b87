"""The ``torchlens-edu`` command: a thin front end over the library.

Each subcommand lives in ``torchlens_edu/commands/<name>.py`` and exposes
``register(subparsers)``; this file assembles them and is the one place where errors become
messages: a bad command line, a :class:`~torchlens_edu.commands.CommandError` and the library's
own errors about the user's input (files, devices, names, values) are one line on stderr and
an exit code; Ctrl-C is ``interrupted`` and exit code 130. Anything else is a bug in
torchlens-edu and keeps its traceback, as does an error of the user's own script under a
debugger (so that VS Code stops at it as uncaught).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from torchlens_edu.commands import EXIT_FAILED, EXIT_USAGE, CommandError, is_from_user_code

# the modules of commands/ (each registers its subcommand's name: compare_models -> compare)
_COMMANDS = ("compare_models", "debug", "demo", "generate", "trace", "vscode")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors reported like every other error (see :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see: {self.prog} --help)", exit_code=EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = _Parser(prog="torchlens-edu", description="See inside transformers while you "
                                                       "learn them.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        module = importlib.import_module(f"torchlens_edu.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchlens-edu``; returns the process exit code.

    >>> main(["trace", "--depth", "-1", "Hi"])  # doctest: +SKIP
    error: argument --depth: must be >= 0, got -1 (see: torchlens-edu trace --help)
    2
    """
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _report("interrupted", label="")
        return EXIT_INTERRUPTED
    except CommandError as err:
        _report(str(err))
        return err.exit_code
    except Exception as err:
        message = None if is_from_user_code(err) else _known_error(err)
        if message is None:
            raise  # a bug in torchlens-edu: its traceback is what a report needs
        _report(message)
        return EXIT_FAILED


def _known_error(err: Exception) -> str | None:
    """The message of an error about the user's input, or None for anything else."""
    import bdb

    if isinstance(err, bdb.BdbQuit):
        return "stopped: you quit the debugger"
    if isinstance(err, OSError) and err.strerror and len(err.args) >= 2:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"  # not "[Errno 2] ...": the file and what went wrong
    if isinstance(err, (ValueError, OSError, MemoryError)):
        return str(err) or type(err).__name__  # the library's checks say what to fix, and how
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return (f"out of memory on the device ({str(err).splitlines()[0]}); try --device cpu, "
                "a shorter prompt or a smaller model")
    from torchlens_edu.models.devices import DeviceUnavailableError

    if isinstance(err, DeviceUnavailableError):
        return str(err)
    return None


def _report(message: str, *, label: str = "error: ") -> None:
    from rich.text import Text

    from torchlens_edu._core.console import get_console

    # soft_wrap: the terminal wraps a long line, so paths and commands copy-paste intact
    get_console(stderr=True).print(Text.assemble((label, "bold red"), message),
                                   soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())

"""Subcommands of ``torchlens-edu``; each module exposes ``register(subparsers)``.

A subcommand reports what the user must fix by raising :class:`CommandError`; ``cli.main``
turns it (and the library's own clear errors) into one line on stderr and an exit code.
"""

from __future__ import annotations

EXIT_FAILED = 1  # the command could not do its job (a missing file, no network, ...)
EXIT_USAGE = 2  # the command line itself is wrong (as argparse uses it)


class CommandError(Exception):
    """One message for the user (what was wrong, what to do) and the exit code.

    >>> CommandError("the prompt is empty", exit_code=EXIT_USAGE).exit_code
    2
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code

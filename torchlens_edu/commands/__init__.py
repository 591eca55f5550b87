"""Subcommands of ``torchlens-edu``; each module exposes ``register(subparsers)``.

A subcommand reports what the user must fix by raising :class:`CommandError`; ``cli.main``
turns it (and the library's own clear errors) into one line on stderr and an exit code. An
error of the user's own code (a script run by ``debug`` under VS Code) is marked with
:func:`from_user_code` and goes through untouched, so the debugger stops at it as uncaught.
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


_USER_CODE = "_torchlens_edu_from_user_code"


def from_user_code(err: BaseException) -> BaseException:
    """Mark ``err`` as raised by the user's own code: ``cli.main`` lets it through as it is.

    >>> is_from_user_code(from_user_code(ValueError("mine")))
    True
    """
    setattr(err, _USER_CODE, True)
    return err


def is_from_user_code(err: BaseException) -> bool:
    """Whether :func:`from_user_code` marked ``err``."""
    return getattr(err, _USER_CODE, False) is True

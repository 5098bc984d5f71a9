"""User-facing errors.

Every command-line entry point catches :class:`UserError`, prints its message as one line
(``error: <message>``) and exits with code 2, without a traceback.  Raise it for anything the
user can fix: a missing file, a wrong key, a wrong frame count, a checkpoint that does not fit.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def run_cli(main):
    """Decorator for CLI ``main`` functions: ``UserError`` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper

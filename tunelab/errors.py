"""The one exception type users see.

Anything raised as ``UserError`` is a problem with the user's input (config, data,
files, impossible combinations). The CLI prints its message as one sentence and
exits with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix; the message names the key or file and the fix."""


class RunInterrupted(Exception):
    """A run stopped cleanly on a signal; ``exit_code`` follows the shell convention (128 + signal number)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for quoting a library error in one sentence."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""

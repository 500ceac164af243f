"""One error type for everything a user can cause, and the handler that prints it.

Anything raised as `UserError` becomes one line on stderr and exit code 2, never a traceback; a `RunStopped` (a
signal, a divergence, a dead process, a full disk) one line and its own exit code. Everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import reprlib
from typing import Any

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input (recipe, data, paths, flags), reported as one line.

    `where` names the key path, file or row the problem is in; it leads the message.
    """

    def __init__(self, message: str, where: str | None = None, echo: bool = True) -> None:
        self.where = where
        self.echo = echo  # False: the same error on a process other than the main one, which prints it
        super().__init__(_one_line(f"{where}: {message}" if where else message))


# Everything str.splitlines() breaks on. `where` is often text the user typed (an override, a key path).
_LINE_BREAKS = {code: repr(chr(code))[1:-1] for code in (*range(0x0A, 0x0E), 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def _one_line(text: str) -> str:
    """`text` with its line breaks escaped (as repr writes them), so the error stays one line."""
    return text.translate(_LINE_BREAKS)


class RunStopped(Exception):
    """A run that cannot go on for a reason outside its inputs, reported as one line with an exit code of its own:
    a signal (128 + its number), a loss gone non-finite, a process that died, a write that failed."""

    def __init__(self, message: str, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(_one_line(message))


EXIT_DIVERGED = 3  # the loss or gradient norm stayed non-finite for training.max_bad_steps steps
EXIT_PROCESS_DIED = 4  # another process of a multi-process run died
EXIT_WRITE_FAILED = 5  # a write failed (a full disk, a quota, a file-size limit)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class RunInterrupted(RunStopped):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; exits 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, 128 + signum)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4


def shown(value: Any) -> str:
    """A short repr of an offending value for an error line: bounded in length and depth, so a 10,000-character
    string, a 400-digit number or a YAML alias bomb (nested lists sharing one object) stays one short line."""
    return _SHORT.repr(value)

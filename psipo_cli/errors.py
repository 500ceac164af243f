"""One error type for everything a user can cause, and the handler that prints it.

Anything raised as `UserError` becomes one line on stderr and exit code 2, never a traceback.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input (recipe, data, paths, flags), reported as one line.

    `where` names the key path, file or row the problem is in; it leads the message.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

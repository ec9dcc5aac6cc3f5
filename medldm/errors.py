"""The one exception type for problems a user can fix (bad file, bad option, bad config)."""

from __future__ import annotations

import os


class MedldmError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero.

    Args:
        message: what is wrong, in words a user understands.
        path: the file or folder concerned; prefixed to the message when given.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

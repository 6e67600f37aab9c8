"""The error every layer raises for a problem the user can fix; the CLI prints it as one line."""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem the user can fix (bad input, bad option); printed as one line, no traceback."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None, exit_code: int = 1):
        super().__init__(problem)
        self.problem = problem
        self.path = None if path is None else str(path)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem

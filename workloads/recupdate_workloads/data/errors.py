"""The one error a loader raises for a file it cannot load at all (bad rows are counted, never raised)."""

from __future__ import annotations

import os


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace runs (newlines included) collapsed to one space, cut at `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class DataError(ValueError):
    """A data source that cannot be loaded: str() is ONE line, '<file>: <problem>', fit for a CLI to print.

    A ValueError, so callers that already report ValueErrors cleanly (e.g. `recupdate local`) keep doing so.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path).replace("\n", "\\n").replace("\r", "\\r")
        self.problem = one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")

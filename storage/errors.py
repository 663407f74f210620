"""One error hierarchy for everything that can go wrong with user input.

Every message names the file (or key) and the problem, so the CLI can print it as one line.
"""

from __future__ import annotations

__all__ = [
    "HiresError",
    "SourceError",
    "StoreError",
    "UsageError",
]


class HiresError(ValueError):
    """Base of all errors caused by user input (files, options, recipes)."""


class SourceError(HiresError):
    """A source image cannot be read: missing, truncated, wrong format, absurd size."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class StoreError(HiresError):
    """A dataset store is missing, malformed, or of an unknown format version."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UsageError(HiresError):
    """An option has a bad value (the CLI exits with 2)."""

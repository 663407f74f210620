"""One error hierarchy for everything that can go wrong with user input.

Every message names the file (or key) and the problem, so the CLI can print it as one line.
"""

from __future__ import annotations

import errno
import resource

__all__ = [
    "HiresError",
    "NoSpaceError",
    "SourceError",
    "StoreError",
    "UsageError",
    "no_space",
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


class NoSpaceError(HiresError):
    """A write failed because the destination is full, over quota or read-only: everything
    finished before it is kept (and marked so); the same command resumes once it can write."""

    def __init__(
        self,
        path: object,
        cause: OSError,
        needed: int | None = None,
        then: str = "what finished is kept and marked complete: free space (or choose another "
        "output) and run the same command again to resume",
    ) -> None:
        self.path = str(path)
        self.cause = cause
        what = {
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the destination is read-only",
        }.get(cause.errno or 0, cause.strerror or str(cause))
        if cause.errno in FILES:  # not the disk: the process's (or system's) open-file limit
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            what = f"too many open files (this process may open {limit}; `ulimit -n` raises it)"
            then = "what finished is kept and marked complete: run the same command again"
            needed = None
        more = f"; about {needed / 1e6:.0f} MB more are needed" if needed else ""
        super().__init__(f"{self.path}: {what} (errno {cause.errno}){more}; {then}")


FILES = (errno.EMFILE, errno.ENFILE)
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, *FILES)  # nothing more can be written now


def no_space(exc: BaseException | None) -> OSError | None:
    """The OSError saying the destination is full, over quota or read-only, or that no more
    files may be open, that ``exc`` is or was raised from (writers wrap it: zarr's stores,
    dask's tasks), else None: nothing further could be written, whichever input came next."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in FULL:
            return exc
        if isinstance(exc, NoSpaceError):
            return exc.cause
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None

"""One writer per store: ``hiresctl tile`` holds an exclusive lock on the store while it writes.

The lock is an advisory ``flock`` on the store's root directory itself, held for the whole run:
no file is added to the store (Zarr readers warn about any object in a hierarchy that is not
part of it). A second writer names the holder's process id where the system lists its locks
(``/proc/locks``). The kernel releases the lock when the holder exits, killed or not, so a dead
writer never blocks a store. Stores given as URLs are not locked.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from storage.errors import StoreError

# Where versions before the directory lock kept theirs; removed when a writer takes the store.
OLD_LOCK_FILE = ".hiresctl-writer.lock"

__all__ = ["StoreBusy", "WriterLock"]


class StoreBusy(StoreError):
    """Another process holds the store's writer lock."""


class WriterLock:
    """``with WriterLock(store):`` holds the store's writer lock or raises :class:`StoreBusy`."""

    def __init__(self, store: str | os.PathLike[str]) -> None:
        self.store = str(store)
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        if "://" in self.store:
            return self
        folder = Path(self.store)
        if folder.exists() and not folder.is_dir():
            return self  # the caller names that problem
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise StoreBusy(
                self.store, f"another writer is active ({holder}); wait for it to finish"
            ) from None
        self._fd = fd
        (folder / OLD_LOCK_FILE).unlink(missing_ok=True)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    """``pid N`` of the process whose flock covers the directory open as ``fd``, from
    ``/proc/locks`` (Linux); ``holder unknown`` elsewhere."""
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "holder unknown"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4321 08:01:1234 0 EOF"; blocked waiters carry "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return f"pid {fields[4]} on {socket.gethostname()}"
    return "holder unknown"

"""One writer per store: ``hiresctl tile`` holds an exclusive lock on the store while it writes.

The lock is ``<store>/.hiresctl-writer.lock``, an advisory ``flock`` held for the whole run. The
file records who holds it (host, pid, start time, command) so a second writer can say who is
active. The kernel releases the lock when the holder exits, killed or not, so a lock left behind
by a dead process is taken over by the next writer; the file staying on disk is normal. Only on
a filesystem without ``flock`` support (some network mounts) can a dead holder block a store:
delete the file once no ``hiresctl tile`` runs on it. Stores given as URLs are not locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from storage.errors import StoreError

LOCK_NAME = ".hiresctl-writer.lock"

__all__ = ["LOCK_NAME", "StoreBusy", "WriterLock"]


class StoreBusy(StoreError):
    """Another process holds the store's writer lock."""


class WriterLock:
    """``with WriterLock(store):`` holds the store's writer lock or raises :class:`StoreBusy`."""

    def __init__(self, store: str | os.PathLike[str]) -> None:
        self.store = str(store)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.store) / LOCK_NAME

    def __enter__(self) -> WriterLock:
        if "://" in self.store:
            return self
        folder = Path(self.store)
        if folder.exists() and not folder.is_dir():
            return self  # the caller names that problem
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(self.path)
            os.close(fd)
            raise StoreBusy(
                self.store,
                f"another writer is active ({holder}); wait for it to finish, or if that "
                f"process is gone on a filesystem without locks, delete {self.path}",
            ) from None
        record: dict[str, object] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv[:3]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _describe(path: Path) -> str:
    try:
        holder: dict[str, Any] = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"

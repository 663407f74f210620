"""Atomic checkpoints: a crash while saving never replaces a good file with a broken one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hiresctl.models.files import safe_torch_load
from storage import StoreError


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StoreError(str(path), "no checkpoint here")
    state = safe_torch_load(path)
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise StoreError(str(path), "not a hiresctl checkpoint")
    return state

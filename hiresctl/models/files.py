"""Loading torch files that may come from anyone: checkpoints, state dicts, pretrained weights."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from storage import StoreError

__all__ = ["one_line", "safe_torch_load"]


def safe_torch_load(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load`` that can never run code: tensors, numbers, strings and containers only
    (``weights_only=True``). A file that needs more (a pickled object, a payload) or that is
    not a torch file at all raises :class:`StoreError` with one line naming ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _unsafe_global(str(exc))
        raise StoreError(
            str(path),
            f"{what} refused: it holds Python objects beyond tensors and plain values"
            f"{f' ({found})' if found else ''}, which loading would have to run; "
            "hiresctl loads weights-only files",
        ) from None
    except Exception as exc:
        raise StoreError(str(path), f"{what} is unreadable ({one_line(exc)})") from None


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch and YAML errors run to many lines)."""
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def _unsafe_global(message: str) -> str:
    """The global a weights-only load refused, from torch's message, e.g. ``posix.system``."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if match:
        return f"it asks for {match.group(1)}"
    match = re.search(r"Unsupported operand (\d+)|Unsupported class ([\w.]+)", message)
    return match.group(0) if match else ""

"""Atomic checkpoints: a crash while saving never replaces a good file with a broken one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiresctl.models.files import one_line, safe_torch_load
from hiresctl.train.recipe import Recipe, valid_keys
from storage import StoreError
from storage.errors import NoSpaceError, no_space

# Recipe keys added after runs were already being saved, with the value those runs computed
# with, so a checkpoint written before a key existed keeps meaning what it meant.
# (Before head_context, PatchGD's head always began with one stride-1 block.)
# (Before global_grad, the global patch's gradient reached the encoder unscaled.)
OLDER_DEFAULTS: dict[str, object] = {
    "head_pool": "avg",
    "head_context": 1,
    "inner_update": "step",
    "global_grad": 1.0,
}


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
    except Exception as exc:
        full = no_space(exc)
        if full is None:
            raise
        then = (
            "the checkpoint it would have replaced is kept: free space and continue with --resume"
            if path.exists()
            else "no checkpoint was written yet: free space and run the same command again"
        )
        raise NoSpaceError(path, full, then=then) from None
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


def checkpoint_recipe(state: dict[str, Any], path: Path) -> Recipe:
    """The recipe a checkpoint was trained with; keys it predates get :data:`OLDER_DEFAULTS`."""
    saved = dict(state["recipe"])
    unknown = sorted(set(saved) - set(valid_keys()))
    if unknown:
        raise StoreError(
            str(path), f"written by a newer hiresctl (unknown recipe keys {', '.join(unknown)})"
        )
    return Recipe(**{**OLDER_DEFAULTS, **saved})


def load_weights_into(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """``model.load_state_dict`` with one line naming ``path`` when the layers do not match
    (a checkpoint of an older network definition, or of another architecture)."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        saved, own = state.get("model") or {}, model.state_dict()
        misfits = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
        detail = (
            f"first misfit {misfits[0]!r}: {tuple(saved[misfits[0]].shape)} saved, "
            f"{tuple(own[misfits[0]].shape)} built"
            if misfits
            else one_line(exc)[:200]
        )
        raise StoreError(
            str(path),
            "its weights do not fit the network its recipe builds (written by another "
            f"hiresctl version?): {detail}; retrain, or evaluate with that version",
        ) from None

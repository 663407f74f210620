"""The lines a training run prints as it goes: within an epoch (at most once a minute) and at
each epoch's end."""

from __future__ import annotations

from typing import Any

import numpy as np


def describe_progress(
    epoch: int, epochs: int, done: int, total: int, images: int, seconds: float, losses: list[float]
) -> str:
    """``epoch 2/10 · batch 40/105 · loss 2.2103 · 1.41 images/s · about 3 min left in the epoch``
    (the loss is this epoch's mean so far)."""
    left = seconds / max(1, done) * (total - done)
    eta = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return (
        f"epoch {epoch}/{epochs} · batch {done}/{total} · loss {float(np.mean(losses)):.4f} · "
        f"{images / max(seconds, 1e-9):.2f} images/s · about {eta} left in the epoch"
    )


def describe_epoch(row: dict[str, Any], epochs: int, monitor: str = "accuracy") -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if row.get(f"val_{monitor}") is not None:
        parts.append(f"val {monitor.replace('_', ' ')} {row[f'val_{monitor}']:.3f}")
    if row.get("images_per_second"):
        parts.append(f"{row['images_per_second']:.2f} images/s")
    parts.append(f"peak {row['peak_memory_gb']:.2f} GB")
    return " · ".join(parts)


__all__ = ["describe_epoch", "describe_progress"]

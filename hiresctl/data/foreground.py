"""Which patches of an image count: the foreground share of every patch of a grid, from the
store's thumbnail-resolution mask, and the patches that training, evaluation and ``embed`` keep.

Patch *choice* within the kept patches (k of N per PatchGD step, IPS's memory, e2e-mil's bag)
belongs to each method's ``plan``, drawn from its batch's seeded generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hiresctl.data.grid import NO_FLIP, Flip, PatchGrid


def foreground_fraction(mask: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Fraction of foreground in each patch (row-major), from a low-resolution mask.

    ``mask`` is the store's foreground label (1, h, w) at thumbnail resolution; it covers the
    whole level, so each patch maps to a box of mask pixels (at least one).
    """
    plane = np.asarray(mask).reshape(mask.shape[-2], mask.shape[-1]) > 0
    mask_h, mask_w = plane.shape
    scale_y, scale_x = mask_h / grid.height, mask_w / grid.width
    # Integral image: O(1) per patch whatever the grid size.
    integral = np.pad(plane.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    rows, cols = grid.position(np.arange(grid.num_patches))
    top, left = rows * grid.stride - grid.offset_y, cols * grid.stride - grid.offset_x
    y0 = np.clip(np.floor(top * scale_y).astype(int), 0, mask_h - 1)
    x0 = np.clip(np.floor(left * scale_x).astype(int), 0, mask_w - 1)
    y1 = np.clip(np.ceil((top + grid.patch_size) * scale_y).astype(int), y0 + 1, mask_h)
    x1 = np.clip(np.ceil((left + grid.patch_size) * scale_x).astype(int), x0 + 1, mask_w)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (total / ((y1 - y0) * (x1 - x0))).astype(np.float64)


def kept_patches(
    dataset: Any, image_id: str, grid: PatchGrid, threshold: float, flip: Flip = NO_FLIP
) -> np.ndarray:
    """Row-major indices of the patches of ``grid`` whose foreground share is at least
    ``threshold`` (all of them at 0, and for an all-background image), of the image as
    ``flip`` mirrors it: the patches training, evaluation and ``embed`` use."""
    kept = np.arange(grid.num_patches)
    if threshold <= 0:
        return kept
    # the mask covers the whole level, so mirroring it mirrors the image's
    mask = flip.pixels(np.asarray(dataset.foreground(image_id)))
    selected = kept[foreground_fraction(mask, grid) >= threshold]
    return selected if len(selected) else kept

"""Per-image-consistent augmentations (albumentations) for patches.

Every patch of an image, and its global patch, gets the same randomly drawn transform in a
given epoch: the parameters are seeded by (image, epoch), so patches read by different
DataLoader workers still agree.

- photometric presets (``augment``: color, stain) change pixel values;
- geometric ones (``geometric``: flip) mirror the whole image, not each patch: the reader lays
  the patch grid over the mirrored image (:class:`hiresctl.data.grid.Flip`), masks are read
  mirrored the same way and boxes follow through albumentations' bbox-aware flips
  (:func:`flip_boxes`), so a patch's pixels, its place on the grid and its labels agree;
- the grid's offset (``grid_offset: random``) moves the whole patch grid by up to a patch
  (:meth:`PatchAugment.offset`), so patch borders cut objects elsewhere every epoch.
"""

from __future__ import annotations

import zlib
from typing import Any

import albumentations as A
import numpy as np
import torch
from albumentations.core.bbox_utils import denormalize_bboxes, normalize_bboxes

from hiresctl.data.grid import NO_FLIP, Flip
from storage import UsageError

AUGMENTATIONS = ("none", "color", "stain")
GEOMETRIC = ("none", "flip")
GRID_OFFSETS = ("none", "random")


def _preset(name: str) -> Any:
    match name:
        case "color":
            return A.Compose(
                [
                    A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.8),
                    A.RandomGamma(gamma_limit=(80, 120), p=0.3),
                ]
            )
        case "stain":  # H&E-style: stronger hue and saturation shifts
            return A.Compose(
                [
                    A.HueSaturationValue(
                        hue_shift_limit=10, sat_shift_limit=25, val_shift_limit=10, p=0.9
                    ),
                    A.RandomBrightnessContrast(p=0.5),
                ]
            )
        case _:
            raise UsageError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")


class PatchAugment:
    """Callable ``(patches (n, 3, h, w) in [0, 1], image_id) -> patches`` (photometric), and
    :meth:`flip` ``(image_id) -> Flip`` (geometric), both drawn per (seed, epoch, image)."""

    def __init__(
        self, name: str, seed: int = 0, geometric: str = "none", grid_offset: str = "none"
    ) -> None:
        if geometric not in GEOMETRIC:
            raise UsageError(
                f"unknown geometric augmentation {geometric!r}; valid: {', '.join(GEOMETRIC)}"
            )
        if grid_offset not in GRID_OFFSETS:
            raise UsageError(
                f"unknown grid offset {grid_offset!r}; valid: {', '.join(GRID_OFFSETS)}"
            )
        self.name = name
        self.seed = seed
        self.geometric = geometric
        self.grid_offset = grid_offset
        self.epoch = 0
        self.transform = None if name == "none" else _preset(name)

    def _key(self, image_id: str, salt: str = "") -> int:
        return zlib.crc32(f"{self.seed}:{self.epoch}:{image_id}{salt}".encode())

    def flip(self, image_id: str) -> Flip:
        """This epoch's mirror of ``image_id``: each of the four (none, horizontal, vertical,
        both) equally likely."""
        if self.geometric == "none":
            return NO_FLIP
        draw = self._key(image_id, ":flip") % 4
        return Flip(vertical=bool(draw & 2), horizontal=bool(draw & 1))

    def offset(self, image_id: str, stride: int) -> tuple[int, int]:
        """This epoch's (offset_y, offset_x) of ``image_id``'s patch grid: each uniform in
        [0, ``stride``) with ``grid_offset: random``, (0, 0) otherwise."""
        if self.grid_offset == "none" or stride <= 1:
            return 0, 0
        key = self._key(image_id, ":offset")
        return key % stride, (key // stride) % stride

    def __call__(self, patches: torch.Tensor, image_id: str) -> torch.Tensor:
        if self.transform is None:
            return patches
        key = self._key(image_id)
        batch = patches.unsqueeze(0) if patches.dim() == 3 else patches
        out = []
        for patch in batch:
            self.transform.set_random_seed(key)
            hwc = patch.permute(1, 2, 0).numpy().astype(np.float32)
            out.append(torch.from_numpy(self.transform(image=hwc)["image"]).permute(2, 0, 1))
        result = torch.stack(out).clamp_(0.0, 1.0)
        return result[0] if patches.dim() == 3 else result


def flip_boxes(boxes: np.ndarray, flip: Flip, height: int, width: int) -> np.ndarray:
    """(n, 4) x0, y0, x1, y1 boxes of a ``height`` × ``width`` image → the same boxes in the
    image mirrored by ``flip`` (albumentations' bbox-aware flips on normalised boxes)."""
    if not flip or not len(boxes):
        return boxes
    shape = (height, width)
    normal = normalize_bboxes(np.asarray(boxes, dtype=np.float32), shape)
    if flip.horizontal:
        normal = A.HorizontalFlip(p=1.0).apply_to_bboxes(normal)
    if flip.vertical:
        normal = A.VerticalFlip(p=1.0).apply_to_bboxes(normal)
    return denormalize_bboxes(normal, shape).astype(np.float32)

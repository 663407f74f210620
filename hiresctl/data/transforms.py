"""Per-image-consistent photometric augmentations (albumentations) for patches.

Every patch of an image, and its global patch, gets the same randomly drawn transform in a
given epoch: the parameters are seeded by (image, epoch), so patches read by different
DataLoader workers still agree. Geometric transforms would have to move patches on the grid
too, so the presets are photometric.
"""

from __future__ import annotations

import zlib
from typing import Any

import albumentations as A
import numpy as np
import torch

from storage import UsageError

AUGMENTATIONS = ("none", "color", "stain")


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
    """Callable ``(patches (n, 3, h, w) in [0, 1], image_id) -> patches``."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.seed = seed
        self.epoch = 0
        self.transform = None if name == "none" else _preset(name)

    def __call__(self, patches: torch.Tensor, image_id: str) -> torch.Tensor:
        if self.transform is None:
            return patches
        key = zlib.crc32(f"{self.seed}:{self.epoch}:{image_id}".encode())
        batch = patches.unsqueeze(0) if patches.dim() == 3 else patches
        out = []
        for patch in batch:
            self.transform.set_random_seed(key)
            hwc = patch.permute(1, 2, 0).numpy().astype(np.float32)
            out.append(torch.from_numpy(self.transform(image=hwc)["image"]).permute(2, 0, 1))
        result = torch.stack(out).clamp_(0.0, 1.0)
        return result[0] if patches.dim() == 3 else result

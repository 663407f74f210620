"""Patch sampling and streaming: locations in, tensors out, never a whole level in memory."""

from hiresctl.data.grid import NO_FLIP, Flip, PatchGrid
from hiresctl.data.images import (
    LabelledImage,
    class_names,
    detection_images,
    labelled_images,
    require_images,
    segmentation_images,
)
from hiresctl.data.reader import PatchReader, normalize, to_tensor, to_unit_rgb
from hiresctl.data.samplers import (
    GridSampler,
    RandomPatchSampler,
    foreground_fraction,
    kept_patches,
)
from hiresctl.data.stream import PatchStream, ReadRequest
from hiresctl.data.transforms import AUGMENTATIONS, GEOMETRIC, PatchAugment, flip_boxes

__all__ = [
    "AUGMENTATIONS",
    "GEOMETRIC",
    "NO_FLIP",
    "Flip",
    "GridSampler",
    "LabelledImage",
    "PatchAugment",
    "PatchGrid",
    "PatchReader",
    "PatchStream",
    "RandomPatchSampler",
    "ReadRequest",
    "class_names",
    "detection_images",
    "flip_boxes",
    "foreground_fraction",
    "kept_patches",
    "labelled_images",
    "normalize",
    "require_images",
    "segmentation_images",
    "to_tensor",
    "to_unit_rgb",
]

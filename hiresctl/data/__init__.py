"""Patch grids, foreground filtering and streaming: locations in, tensors out, never a whole level in memory."""

from hiresctl.data.foreground import foreground_fraction, kept_patches
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
from hiresctl.data.stream import NO_TAG, PatchStream, PlannedReads, ReadRequest, ReadTag
from hiresctl.data.transforms import AUGMENTATIONS, GEOMETRIC, PatchAugment, flip_boxes

__all__ = [
    "AUGMENTATIONS",
    "GEOMETRIC",
    "NO_FLIP",
    "NO_TAG",
    "Flip",
    "LabelledImage",
    "PatchAugment",
    "PatchGrid",
    "PatchReader",
    "PatchStream",
    "PlannedReads",
    "ReadRequest",
    "ReadTag",
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

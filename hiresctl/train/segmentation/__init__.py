"""Segmentation: the task, the base its methods share (and the loss), its methods, each a module
(PatchGD and PatchGD + global patch, the whole-image baselines), and its metrics. Importing the
package registers them, the task first."""

from hiresctl.train.segmentation.base import IGNORE, SegmentationMethod, segmentation_loss
from hiresctl.train.segmentation.task import Segmentation, predict_segmentation

# the methods register after their task, in the order `hiresctl methods` lists them
# isort: off
from hiresctl.train.segmentation import patchgd, baselines
# isort: on

__all__ = [
    "IGNORE",
    "Segmentation",
    "SegmentationMethod",
    "baselines",
    "patchgd",
    "predict_segmentation",
    "segmentation_loss",
]

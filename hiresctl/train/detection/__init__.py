"""Detection: the task, the base its methods share (FCOS on patches), its methods, each a
module (PatchGD and PatchGD + global patch, ``sliced``, ``downsample``), and COCO scoring by
pycocotools (``coco.py``). Importing the package registers them, the task first."""

from hiresctl.train.detection.base import DetectionMethod
from hiresctl.train.detection.task import (
    Detection,
    coco_truth,
    detection_metrics,
    predict_detections,
)

# the methods register after their task, in the order `hiresctl methods` lists them
# isort: off
from hiresctl.train.detection import patchgd, downsample, sliced
# isort: on

__all__ = [
    "Detection",
    "DetectionMethod",
    "coco_truth",
    "detection_metrics",
    "downsample",
    "patchgd",
    "predict_detections",
    "sliced",
]

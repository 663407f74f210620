"""The tasks: classification, detection and segmentation, each registered by name.

Importing this package registers the built-in tasks (their modules import their methods, which
register those too)."""

from hiresctl.train.tasks.base import Task, TileHook
from hiresctl.train.tasks.classification import (
    Classification,
    classification_metrics,
    per_class,
    predict_images,
)
from hiresctl.train.tasks.detection import (
    Detection,
    coco_truth,
    detection_metrics,
    predict_detections,
)
from hiresctl.train.tasks.segmentation import Segmentation, predict_segmentation

__all__ = [
    "Classification",
    "Detection",
    "Segmentation",
    "Task",
    "TileHook",
    "classification_metrics",
    "coco_truth",
    "detection_metrics",
    "per_class",
    "predict_detections",
    "predict_images",
    "predict_segmentation",
]

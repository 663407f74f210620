"""Trainers: one loop for every method, checkpoints, memory accounting, torchrun DDP.

A task is a folder (``classification/``, ``detection/``, ``segmentation/``) holding its task,
the base its methods subclass, its methods and its metrics; importing this package registers
them all (``registry``), then plugins."""

from hiresctl.train import classification, detection, segmentation  # registers tasks and methods
from hiresctl.train.checkpoint import atomic_save, load_checkpoint
from hiresctl.train.classification import (
    ClassificationMethod,
    classification_metrics,
    predict_images,
)
from hiresctl.train.detection import (
    DetectionMethod,
    coco_truth,
    detection_metrics,
    predict_detections,
)
from hiresctl.train.memory import MemoryPlan, PatchCost, PeakMemory, peak_rss_bytes
from hiresctl.train.methods import Heatmap, Method, StepContext, create_method
from hiresctl.train.recipe import Recipe, dump_recipe, load_recipe, parse_set, valid_keys
from hiresctl.train.registry import (
    load_plugins,
    method_class,
    method_names,
    register_method,
    register_task,
    task_names,
)
from hiresctl.train.run import (
    TrainingDiverged,
    build_run,
    get_task,
    inference_device,
    load_run,
    read_metrics,
    resolve_device,
    step_context,
)
from hiresctl.train.segmentation import SegmentationMethod, predict_segmentation
from hiresctl.train.task import Run, Task, TileHook
from hiresctl.train.trainer import Trainer, TrainResult

load_plugins()  # after the built-ins, so that a plugin may subclass (or replace) them

__all__ = [
    "ClassificationMethod",
    "DetectionMethod",
    "Heatmap",
    "MemoryPlan",
    "Method",
    "PatchCost",
    "PeakMemory",
    "Recipe",
    "Run",
    "SegmentationMethod",
    "StepContext",
    "Task",
    "TileHook",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "atomic_save",
    "build_run",
    "classification",
    "classification_metrics",
    "coco_truth",
    "create_method",
    "detection",
    "detection_metrics",
    "dump_recipe",
    "get_task",
    "inference_device",
    "load_checkpoint",
    "load_recipe",
    "load_run",
    "method_class",
    "method_names",
    "parse_set",
    "peak_rss_bytes",
    "predict_detections",
    "predict_images",
    "predict_segmentation",
    "read_metrics",
    "register_method",
    "register_task",
    "resolve_device",
    "segmentation",
    "step_context",
    "task_names",
    "valid_keys",
]

"""Trainers: one loop for every method, checkpoints, memory accounting, torchrun DDP.

Importing the package registers the built-in tasks and methods (``registry``)."""

# The method modules register their methods; the tasks package registers the tasks.
from hiresctl.train import classify, detection, mil, patchgd, segmentation  # noqa: F401
from hiresctl.train.checkpoint import atomic_save, load_checkpoint
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
    Run,
    TrainingDiverged,
    build_run,
    get_task,
    load_run,
    read_metrics,
    resolve_device,
    step_context,
)
from hiresctl.train.tasks import (
    Task,
    classification_metrics,
    coco_truth,
    detection_metrics,
    predict_detections,
    predict_images,
    predict_segmentation,
)
from hiresctl.train.trainer import Trainer, TrainResult

load_plugins()  # after the built-ins, so that a plugin may subclass (or replace) them

__all__ = [
    "Heatmap",
    "MemoryPlan",
    "Method",
    "PatchCost",
    "PeakMemory",
    "Recipe",
    "Run",
    "StepContext",
    "Task",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "atomic_save",
    "build_run",
    "classification_metrics",
    "coco_truth",
    "create_method",
    "detection_metrics",
    "dump_recipe",
    "get_task",
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
    "step_context",
    "task_names",
    "valid_keys",
]

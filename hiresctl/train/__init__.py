"""Trainers: one loop for every method, checkpoints, memory accounting, torchrun DDP."""

from hiresctl.train.checkpoint import atomic_save, load_checkpoint
from hiresctl.train.memory import MemoryPlan, PeakMemory, peak_rss_bytes
from hiresctl.train.methods import METHOD_CLASSES, Heatmap, Method, StepContext, create_method
from hiresctl.train.recipe import (
    METHODS,
    TASKS,
    Recipe,
    dump_recipe,
    load_recipe,
    parse_set,
    valid_keys,
)
from hiresctl.train.trainer import (
    Run,
    Trainer,
    TrainingDiverged,
    TrainResult,
    build_run,
    classification_metrics,
    load_run,
    predict_images,
    predict_segmentation,
    resolve_device,
    step_context,
    task_classes,
)

__all__ = [
    "METHODS",
    "METHOD_CLASSES",
    "TASKS",
    "Heatmap",
    "MemoryPlan",
    "Method",
    "PeakMemory",
    "Recipe",
    "Run",
    "StepContext",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "atomic_save",
    "build_run",
    "classification_metrics",
    "create_method",
    "dump_recipe",
    "load_checkpoint",
    "load_recipe",
    "load_run",
    "parse_set",
    "peak_rss_bytes",
    "predict_images",
    "predict_segmentation",
    "resolve_device",
    "step_context",
    "task_classes",
    "valid_keys",
]

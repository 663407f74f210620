"""Classification: the task, the base its methods share, and its methods, each a module:
PatchGD and PatchGD + global patch (``patchgd.py``), Iterative Patch Selection (``ips.py``),
the whole-image baselines (``baselines.py``) and multiple-instance learning on stored features
or random patches (``mil.py``). Importing the package registers them, the task first."""

from hiresctl.train.classification.base import ClassificationMethod
from hiresctl.train.classification.metrics import classification_metrics, per_class
from hiresctl.train.classification.task import Classification, predict_images

# the methods register after their task, in the order `hiresctl methods` lists them
# isort: off
from hiresctl.train.classification import patchgd, ips, baselines, mil
# isort: on

__all__ = [
    "Classification",
    "ClassificationMethod",
    "baselines",
    "classification_metrics",
    "ips",
    "mil",
    "patchgd",
    "per_class",
    "predict_images",
]

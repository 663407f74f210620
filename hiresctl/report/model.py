"""What a report is made of: one run's evaluation and figures, and the names of the metrics.
The build (evaluation, figures) fills it; the renderers (HTML, Markdown) read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = {
    "nlr",
    "train_peak_gb",
    "eval_peak_gb",
    "train_seconds",
    "prepared_seconds",
    "total_seconds",
}
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "pixel_accuracy": "Pixel accuracy",
    "balanced_accuracy": "Balanced acc.",
    "macro_f1": "Macro F1",
    "auc": "AUC",
    "kappa_quadratic": "Quadratic κ",
    "f1": "F1",
    "iou": "IoU",
    "mean_iou": "Mean IoU",
    "plr": "PLR",
    "nlr": "NLR",
    "train_peak_gb": "Train peak GB",
    "eval_peak_gb": "Eval peak GB",
    "train_images_per_second": "Train images/s",
    "eval_images_per_second": "Eval images/s",
    "ap": "AP",
    "ap50": "AP50",
    "ap75": "AP75",
    "ap_small": "APs",
    "ap_medium": "APm",
    "ap_large": "APl",
    "ar": "AR",
    "train_seconds": "Train s",
    "prepared_seconds": "Features s",
    "total_seconds": "Total s",
}


@dataclass
class Figure:
    """A PNG written under the report folder; ``uri`` embeds it in the HTML."""

    path: str  # relative to the report folder
    uri: str
    caption: str
    link: str | None = None  # relative path of a larger or plainer version


@dataclass
class RunReport:
    name: str
    folder: Path
    recipe: dict[str, Any]
    summary: dict[str, Any]
    curves: list[dict[str, Any]]
    result: dict[str, Any]
    setting: dict[str, str]  # input, patch, sampling, sees
    shown: list[Figure] = field(default_factory=list)
    roc: dict[str, Any] | None = None


__all__ = ["LOWER_IS_BETTER", "METRIC_NAMES", "Figure", "RunReport"]

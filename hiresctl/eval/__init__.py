"""Evaluation: metrics of a trained run on a split of a dataset store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hiresctl.eval.classification import evaluate_classification
from hiresctl.eval.detection import evaluate_detection
from hiresctl.eval.segmentation import evaluate_segmentation
from hiresctl.train import Run
from storage import StoreError


def run_task(run_dir: str | Path) -> str:
    """The task a run folder was trained for (from its saved recipe)."""
    path = Path(run_dir) / "recipe.yaml"
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise StoreError(str(run_dir), "not a run folder (no recipe.yaml); train first") from None
    return str(recipe.get("task", "cls"))


def evaluate(run_dir: str | Path, data: str | Path, split: str = "test", device: str = "auto",
             checkpoint: str = "best", on_tile: Any = None, run: Run | None = None,
             ) -> dict[str, Any]:  # fmt: skip
    """Evaluate a run with its task's metrics (``on_tile``: segmentation's tile hook; ``run``:
    the run already loaded from ``run_dir``, else it is loaded here)."""
    task = run_task(run_dir)
    if task == "det":
        return evaluate_detection(run_dir, data, split, device, checkpoint, run=run)
    if task == "seg":
        return evaluate_segmentation(run_dir, data, split, device, checkpoint, on_tile=on_tile,
                                     run=run)  # fmt: skip
    return evaluate_classification(run_dir, data, split, device, checkpoint, run=run)


__all__ = [
    "evaluate",
    "evaluate_classification",
    "evaluate_detection",
    "evaluate_segmentation",
    "run_task",
]

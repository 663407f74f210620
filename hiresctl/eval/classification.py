"""Evaluate a classification run on a split of a dataset store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hiresctl.data import labelled_images, require_images
from hiresctl.eval.common import result_header, save_result
from hiresctl.train import classification_metrics, load_run, predict_images, resolve_device
from storage import Dataset


def evaluate_classification(
    run_dir: str | Path,
    data: str | Path,
    split: str = "test",
    device: str = "auto",
    checkpoint: str = "best",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Metrics of ``run_dir``'s model on ``split``; also written to ``RUN/eval-<split>.json``."""
    dataset = Dataset(data)
    torch_device = resolve_device(device)
    run = load_run(run_dir, dataset, torch_device, checkpoint)
    images, problems = labelled_images(dataset, split, run.classes)
    require_images(images, dataset, split)
    logits, targets, stats = predict_images(run, images, batch_size or run.recipe.batch_size)
    metrics = classification_metrics(logits, targets, len(run.classes))
    matrix = metrics.pop("confusion_matrix", [])
    count = metrics.pop("count", 0)
    result = result_header(run, run_dir, data, split, count, stats, torch_device)
    result.update({"metrics": metrics, "confusion_matrix": matrix, "skipped": problems})
    return save_result(run_dir, split, result)

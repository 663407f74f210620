"""Evaluate a classification run on a split of a dataset store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hiresctl.data import labelled_images, require_images
from hiresctl.eval.common import result_header, save_result
from hiresctl.train import Run, classification_metrics, load_run, predict_images, resolve_device
from storage import Dataset


def per_class(matrix: list[list[int]], classes: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows: true)."""
    m = np.asarray(matrix, dtype=float)
    out: dict[str, dict[str, Any]] = {}
    if m.size == 0:
        return out
    for i, name in enumerate(classes):
        tp, predicted, support = m[i, i], m[:, i].sum(), m[i].sum()
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (2 * precision * recall / (precision + recall)
              if precision and recall else (0.0 if support else None))  # fmt: skip
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    return out


def evaluate_classification(
    run_dir: str | Path,
    data: str | Path,
    split: str = "test",
    device: str = "auto",
    checkpoint: str = "best",
    batch_size: int | None = None,
    run: Run | None = None,
) -> dict[str, Any]:
    """Metrics of ``run_dir``'s model on ``split``; also written to ``RUN/eval-<split>.json``."""
    dataset = Dataset(data)
    torch_device = resolve_device(device)
    run = run or load_run(run_dir, dataset, torch_device, checkpoint)
    images, problems = labelled_images(dataset, split, run.classes)
    require_images(images, dataset, split)
    logits, targets, stats = predict_images(run, images, batch_size or run.recipe.batch_size)
    metrics = classification_metrics(logits, targets, len(run.classes))
    matrix = metrics.pop("confusion_matrix", [])
    count = metrics.pop("count", 0)
    probabilities = logits.softmax(1)
    per_image = [
        {
            "id": image.image_id,
            "target": run.classes[int(t)],
            "predicted": run.classes[int(p.argmax())],
            "correct": bool(int(p.argmax()) == int(t)),
            "confidence": float(p.max()),
            "p_target": float(p[int(t)]),
            "probabilities": [round(float(v), 6) for v in p],
        }
        for image, t, p in zip(images, targets, probabilities, strict=True)
    ]
    result = result_header(run, run_dir, data, split, count, stats, torch_device)
    result.update({"metrics": metrics, "confusion_matrix": matrix, "per_class": per_class(matrix, run.classes),
                   "per_image": per_image, "skipped": problems})  # fmt: skip
    return save_result(run_dir, split, result)

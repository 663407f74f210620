"""Evaluate a segmentation run: full-resolution predictions against full-resolution masks, both
streamed tile by tile from the store (docs/methods.md §8)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiresctl.data import require_images, segmentation_images
from hiresctl.eval.common import result_header, save_result
from hiresctl.train import Run, load_run, predict_segmentation, resolve_device
from hiresctl.train.segmentation import binary_image_metrics, segmentation_metrics
from storage import Dataset


def evaluate_segmentation(
    run_dir: str | Path,
    data: str | Path,
    split: str = "test",
    device: str = "auto",
    checkpoint: str = "best",
    on_tile: Callable[[str, int, int, torch.Tensor, np.ndarray, np.ndarray | None], None]
    | None = None,
    run: Run | None = None,
) -> dict[str, Any]:
    """Metrics of ``run_dir``'s model on ``split``; also written to ``RUN/eval-<split>.json``.
    ``on_tile`` sees every predicted tile with its truth (see ``predict_segmentation``)."""
    dataset = Dataset(data)
    torch_device = resolve_device(device)
    run = run or load_run(run_dir, dataset, torch_device, checkpoint)
    images, problems = segmentation_images(dataset, split, run.classes)
    require_images(images, dataset, split)
    matrices, stats = predict_segmentation(run, images, on_tile=on_tile)
    metrics = segmentation_metrics(matrices, run.classes)
    binary = len(run.classes) == 2
    per_image = []
    for image, matrix in zip(images, matrices, strict=True):
        row: dict[str, Any] = {"id": image.image_id, "pixels": int(matrix.sum())}
        if binary:
            row.update({k: (None if not np.isfinite(v) else v)
                        for k, v in binary_image_metrics(matrix).items()})  # fmt: skip
        else:
            t = np.diag(matrix).astype(float)
            union = matrix.sum(0) + matrix.sum(1) - t
            row["mean_iou"] = (
                float((t[union > 0] / union[union > 0]).mean()) if (union > 0).any() else 0.0
            )
        per_image.append(row)
    scalars = {k: v for k, v in metrics.items()
               if isinstance(v, float) and k not in ("count",)}  # fmt: skip
    result = result_header(run, run_dir, data, split, len(images), stats, torch_device)
    result.update({
        "metrics": scalars,
        "undefined": metrics.get("undefined", {}),
        "nan_policy": metrics.get("nan_policy"),
        "pooled": metrics.get("pooled"),
        "per_class": metrics.get("per_class"),
        "per_image": per_image,
        "confusion_matrix": np.sum(matrices, axis=0).tolist() if matrices else [],
        "skipped": problems,
    })  # fmt: skip
    return save_result(run_dir, split, result)

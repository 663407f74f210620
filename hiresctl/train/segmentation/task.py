"""Segmentation: masks from the store, full-resolution inference tile by tile against the
store's masks (streamed tile by tile too), IoU, Dice and the rest of docs/methods.md §8."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hiresctl.data import LabelledImage, ReadRequest, segmentation_images
from hiresctl.models import SEG_NETWORKS
from hiresctl.train import distributed
from hiresctl.train.methods import Reads, StepContext
from hiresctl.train.registry import register_task
from hiresctl.train.run import Inference
from hiresctl.train.segmentation.base import SegmentationMethod, predicted_classes
from hiresctl.train.segmentation.metrics import (
    binary_image_metrics,
    confusion,
    monitor_key,
    segmentation_metrics,
)
from hiresctl.train.task import Run, Task, TileHook
from storage import Dataset, StoreError


def predict_segmentation(
    run: Run,
    images: list[LabelledImage],
    num_workers: int = 0,
    on_tile: TileHook | None = None,
    with_targets: bool = True,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Segment ``images`` tile by tile at full resolution; per image, the confusion matrix
    against the store's mask (streamed tile by tile too), with timing and peak memory.
    ``on_tile(image_id, y, x, logits, classes, truth)`` sees every tile (e.g. to write
    predictions); ``truth`` is the tile's class indices (-1 unknown), None without targets."""
    method: SegmentationMethod = run.task.method(run)
    inference = Inference(run, (method.plan_image(im.image_id) for im in images), num_workers)
    classes = len(run.classes)
    matrices = []
    for image in images:
        matrix = np.zeros((classes, classes), dtype=np.int64)
        for y, x, logits in method.predict_tiles(inference.ctx, image.image_id, inference.batch()):
            pred = predicted_classes(logits).numpy()
            truth = None
            if with_targets:
                height, width = pred.shape
                truth = run.reader.read_mask_region(image.image_id, y, x, width, height)
                matrix += confusion(pred, truth, classes)
            if on_tile is not None:
                on_tile(image.image_id, y, x, logits, pred, truth)
        matrices.append(matrix)
    stats = inference.stats(len(images))
    return matrices, stats


@register_task("seg")
class Segmentation(Task[SegmentationMethod]):
    method_base = SegmentationMethod
    title = "segmentation"
    # θ1 is a U-Net with 8 output channels, k=4 patches per inner step (the seed paper's DRIVE
    # setting, docs/methods.md §5). Measured on DRIVE (BENCHMARKS.md, "Learning: DRIVE"): with
    # the paper's J=4, accumulation 2, batch 4 and lr 1e-4, 12 epochs took 48 optimizer steps
    # and reached test F1 0.26, where a plain U-Net on random crops took 2,300 steps in the same
    # time; an update per inner step, batch 2, lr 1e-3 and J = ceil(N/k) (the fill's cost shared
    # by every patch of the image) learn as fast per minute as that network, and the grid's
    # random offset and mirroring replace the random crops.
    defaults: ClassVar[dict[str, Any]] = {
        "backbone": "unet",
        "latent_dim": 8,
        "patch_size": 128,
        "lr": 1e-3,
        "batch_size": 2,
        "accumulation_steps": 1,
        "inner_steps": None,
        "patches_per_step": 4,
        "calibration_batches": 0,
        "geometric": "flip",
    }
    table_metrics = ("f1", "iou", "mean_iou", "accuracy", "balanced_accuracy", "plr", "nlr")
    train_accuracy = "Training pixel accuracy"
    judged = "pixels"
    legend = ("true positive", "false positive", "false negative")

    def backbones(self) -> tuple[str, ...]:
        return tuple(SEG_NETWORKS)

    def classes(self, dataset: Dataset) -> tuple[list[str], list[int] | None]:
        named = dataset.mask_classes()
        if len(named) < 2:
            raise StoreError(
                dataset.path,
                f"needs masks with at least 2 label values to train a segmenter, found "
                f"{list(named) or 'no masks'} (tile with --masks DIR)",
            )
        return list(named.values()), list(named)

    def images(
        self, dataset: Dataset, split: str, classes: list[str]
    ) -> tuple[list[LabelledImage], list[str]]:
        return segmentation_images(dataset, split, classes)

    def monitor(self, classes: list[str]) -> str:
        return monitor_key(len(classes))

    def infer(
        self, run: Run, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> list[list[tuple[int, int, torch.Tensor]]]:
        """Each image's tiles (y, x, logits); the batch's reads are held until every image's
        have arrived (for tests and benchmarks: evaluation streams image by image)."""
        method = self.method(run)
        by_image: dict[str, list[tuple[ReadRequest, torch.Tensor]]] = {}
        for request, pixels in reads:
            by_image.setdefault(request.image_id, []).append((request, pixels))
        return [list(method.predict_tiles(ctx, i, iter(by_image.get(i, [])))) for i in image_ids]

    def validate(
        self, run: Run, images: list[LabelledImage], world: distributed.World
    ) -> dict[str, Any]:
        matrices, _ = predict_segmentation(run, images[world.rank :: world.size])
        gathered = distributed.gather_objects(matrices, world)
        return segmentation_metrics([m for part in gathered for m in part], run.classes)  # type: ignore[attr-defined]

    def evaluate(
        self,
        run: Run,
        images: list[LabelledImage],
        folder: Path,
        split: str,
        on_tile: TileHook | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        matrices, stats = predict_segmentation(run, images, on_tile=on_tile)
        metrics = segmentation_metrics(matrices, run.classes)
        binary = len(run.classes) == 2
        per_image = []
        for image, matrix in zip(images, matrices, strict=True):
            row: dict[str, Any] = {"id": image.image_id, "pixels": int(matrix.sum())}
            if binary:
                row.update(
                    {
                        k: (None if not np.isfinite(v) else v)
                        for k, v in binary_image_metrics(matrix).items()
                    }
                )
            else:
                t = np.diag(matrix).astype(float)
                union = matrix.sum(0) + matrix.sum(1) - t
                row["mean_iou"] = (
                    float((t[union > 0] / union[union > 0]).mean()) if (union > 0).any() else 0.0
                )
            per_image.append(row)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float) and k not in ("count",)}
        body = {
            "metrics": scalars,
            "undefined": metrics.get("undefined", {}),
            "nan_policy": metrics.get("nan_policy"),
            "pooled": metrics.get("pooled"),
            "per_class": metrics.get("per_class"),
            "per_image": per_image,
            "confusion_matrix": np.sum(matrices, axis=0).tolist() if matrices else [],
        }
        return body, stats


__all__ = ["Segmentation", "predict_segmentation"]

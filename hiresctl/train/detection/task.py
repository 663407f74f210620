"""Detection: boxes from the store, inference merged into level-0 boxes, COCO AP by pycocotools
(docs/methods.md §4, §8). Evaluation also writes the two files pycocotools read, so anyone can
check the numbers or compute others: ``detections-<split>.json`` (COCO results) and
``ground-truth-<split>.json`` (the COCO dataset built from the store's boxes, level-0 pixels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hiresctl.data import LabelledImage, detection_images
from hiresctl.models.detection import DET_BACKBONES
from hiresctl.train import distributed
from hiresctl.train.detection.base import PREDICT_SCORE_THRESHOLD, DetectionMethod
from hiresctl.train.detection.coco import (
    COCO_KEYS,
    coco_boxes,
    coco_ground_truth,
    coco_metrics,
    coco_results,
    match_detections,
)
from hiresctl.train.methods import Reads, StepContext
from hiresctl.train.registry import register_task
from hiresctl.train.run import Inference
from hiresctl.train.task import Run, Task, TileHook
from storage import Dataset, StoreError


def predict_detections(
    run: Run,
    images: list[LabelledImage],
    num_workers: int = 0,
    batch_size: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
    """Boxes (x0, y0, x1, y1 in level-0 pixels), scores and labels per image at the evaluation
    score threshold, with timing and peak memory."""
    method: DetectionMethod = run.task.method(run)
    size = batch_size or run.recipe.batch_size
    batches = [images[i : i + size] for i in range(0, len(images), size)]
    plans = (method.plan([im.image_id for im in batch], 0, train=False) for batch in batches)
    inference = Inference(run, plans, num_workers)
    found: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        ids = [im.image_id for im in batch]
        for image_id, d in zip(
            ids, method.detect(inference.ctx, ids, inference.batch()), strict=True
        ):
            _, height, width = run.reader.shape(image_id)
            _, height0, width0 = run.reader.entry(image_id).shape
            scale = torch.tensor([width0 / width, height0 / height] * 2)
            found.append({**d, "boxes": d["boxes"] * scale})
    stats = inference.stats(len(images))
    return found, stats


def detection_metrics(
    run: Run, images: list[LabelledImage], detections: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """COCO metrics of ``detections`` against the store's boxes (level-0 pixels)."""
    truth = coco_truth(run, images)
    return coco_metrics(truth, coco_results(detections), run.recipe.max_detections)


def coco_truth(run: Run, images: list[LabelledImage]) -> dict[str, Any]:
    """The COCO ground truth of ``images`` from the store, in level-0 pixels."""
    ids = [im.image_id for im in images]
    sizes, truth = [], []
    index = {name: i for i, name in enumerate(run.classes)}
    for image_id in ids:
        _, height, width = run.reader.entry(image_id).shape
        sizes.append((height, width))
        boxes, names = run.reader.dataset.boxes(image_id)
        labels = np.array([index.get(n, -1) for n in names], dtype=np.int64)
        keep = labels >= 0
        truth.append((boxes[keep], labels[keep]))
    return coco_ground_truth(ids, sizes, truth, run.classes)


@register_task("det")
class Detection(Task[DetectionMethod]):
    title = "detection"
    method_base = DetectionMethod
    # ResNet+FPN FCOS on 512-pixel patches, GroupNorm (no head BatchNorm to recalibrate), the
    # global map fused by one conv over the concatenation (docs/methods.md §4, §7)
    defaults: ClassVar[dict[str, Any]] = {
        "patch_size": 512,
        "fusion": "concat",
        "calibration_batches": 0,
    }
    reads_boxes = True
    table_metrics = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar")
    train_accuracy = "Training pixel accuracy"  # detection reports none
    judged = "pixels"
    legend = (
        "detection matching a true box (TP)",
        "detection matching none (FP)",
        "true box no detection found (FN)",
    )

    def backbones(self) -> tuple[str, ...]:
        return tuple(DET_BACKBONES)

    def classes(self, dataset: Dataset) -> tuple[list[str], list[int] | None]:
        names = dataset.box_classes()
        if not names:
            raise StoreError(
                dataset.path,
                "has no object annotations to train a detector (tile with --coco FILE or "
                "--annotations PATH)",
            )
        return names, None

    def images(
        self, dataset: Dataset, split: str, classes: list[str]
    ) -> tuple[list[LabelledImage], list[str]]:
        return detection_images(dataset, split, classes)

    def monitor(self, classes: list[str]) -> str:
        return "ap"

    def infer(
        self, run: Run, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> list[dict[str, torch.Tensor]]:
        return self.method(run).detect(ctx, image_ids, reads)

    def validate(
        self, run: Run, images: list[LabelledImage], world: distributed.World
    ) -> dict[str, Any]:
        share = images[world.rank :: world.size]
        found, _ = predict_detections(run, share)
        gathered = distributed.gather_objects((share, found), world)
        every = [im for part in gathered for im in part[0]]  # type: ignore[index]
        detections = [d for part in gathered for d in part[1]]  # type: ignore[index]
        return detection_metrics(run, every, detections)

    def evaluate(
        self,
        run: Run,
        images: list[LabelledImage],
        folder: Path,
        split: str,
        on_tile: TileHook | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        found, stats = predict_detections(run, images)
        truth = coco_truth(run, images)
        results = coco_results(found)
        (folder / f"ground-truth-{split}.json").write_text(json.dumps(truth))
        (folder / f"detections-{split}.json").write_text(json.dumps(results))
        metrics = coco_metrics(truth, results, run.recipe.max_detections)
        per_image = []
        pairs = zip(images, found, coco_boxes(truth), strict=True)
        for image, d, (true_boxes, true_labels) in pairs:
            # what a user of `hiresctl predict` would see: boxes scored ≥ its threshold, matched
            # at IoU 0.5
            keep = d["scores"].numpy() >= PREDICT_SCORE_THRESHOLD
            hits, found_truth = match_detections(
                true_boxes,
                true_labels,
                d["boxes"].numpy()[keep],
                d["scores"].numpy()[keep],
                d["labels"].numpy()[keep],
            )
            per_image.append(
                {
                    "id": image.image_id,
                    "objects": len(true_boxes),
                    "detections": len(d["scores"]),
                    "shown": int(keep.sum()),
                    "found": int(found_truth.sum()),
                    "missed": int((~found_truth).sum()),
                    "false_positives": int((~hits).sum()),
                    "recall": float(found_truth.mean()) if len(true_boxes) else None,
                }
            )
        body = {
            "metrics": {k: metrics[k] for k in (*COCO_KEYS, "ar")},
            "recall": {
                k: metrics.get(k)
                for k in ("ar1", "ar10", "ar", "ar_small", "ar_medium", "ar_large")
            },
            "per_class": metrics["per_class"],
            "by_size": metrics["by_size"],
            "pr_curve": metrics["pr_curve"],
            "matching": {
                "iou": 0.5,
                "score_threshold": PREDICT_SCORE_THRESHOLD,
                "note": "per_image found/missed/false_positives: boxes scored at least "
                "score_threshold, matched to true boxes of their class at IoU ≥ iou",
            },
            "objects": metrics["objects"],
            "detections": metrics["detections"],
            "max_detections": run.recipe.max_detections,
            "files": {
                "ground_truth": str(folder / f"ground-truth-{split}.json"),
                "detections": str(folder / f"detections-{split}.json"),
            },
            "per_image": per_image,
        }
        return body, stats


__all__ = ["Detection", "coco_truth", "detection_metrics", "predict_detections"]

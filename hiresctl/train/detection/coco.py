"""COCO scoring of detections by pycocotools (docs/methods.md §8): the COCO dataset of the
store's boxes, COCO results of a run's boxes, COCOeval's AP and AR (overall, by size, per class,
the precision–recall curve) and COCO's greedy matching at one IoU (the report's overlays)."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

Detections = dict[str, torch.Tensor]  # boxes (n, 4), scores (n,), labels (n,)

COCO_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
RECALL_KEYS = ("ar1", "ar10", "ar", "ar_small", "ar_medium", "ar_large")


def coco_ground_truth(
    image_ids: list[str],
    sizes: list[tuple[int, int]],
    truth: list[tuple[np.ndarray, np.ndarray]],
    classes: list[str],
) -> dict[str, Any]:
    """A COCO detection dataset (image ids 1..N in the given order, category ids 1..C in the
    run's class order, boxes [x, y, w, h] in level-0 pixels)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for number, (image_id, (height, width), (boxes, labels)) in enumerate(
        zip(image_ids, sizes, truth, strict=True), start=1
    ):
        images.append({"id": number, "file_name": image_id, "height": height, "width": width})
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": number,
                    "category_id": int(label) + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_boxes(dataset: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image of a COCO dataset or results' image order (ids 1..N, as
    :func:`coco_ground_truth` numbers them): (n, 4) x0, y0, x1, y1 boxes and (n,) class
    indices (category id − 1)."""
    count = len(dataset["images"])
    boxes: list[list[list[float]]] = [[] for _ in range(count)]
    labels: list[list[int]] = [[] for _ in range(count)]
    for a in dataset["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"] - 1].append([x, y, x + w, y + h])
        labels[a["image_id"] - 1].append(a["category_id"] - 1)
    return [
        (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(c, np.int64))
        for b, c in zip(boxes, labels, strict=True)
    ]


def coco_results(detections: list[Detections]) -> list[dict[str, Any]]:
    """COCO results: one {image_id, category_id, bbox [x, y, w, h], score} per box."""
    out = []
    for number, d in enumerate(detections, start=1):
        for box, score, label in zip(
            d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(), strict=True
        ):
            out.append(
                {
                    "image_id": number,
                    "category_id": int(label) + 1,
                    "bbox": [
                        round(box[0], 2),
                        round(box[1], 2),
                        round(box[2] - box[0], 2),
                        round(box[3] - box[1], 2),
                    ],
                    "score": round(float(score), 5),
                }
            )
    return out


def coco_metrics(
    ground_truth: dict[str, Any], results: list[dict[str, Any]], max_detections: int = 100
) -> dict[str, Any]:
    """COCO AP, AP50, AP75, APs/m/l, AR and per-class AP by pycocotools' COCOeval (bbox), with
    ``maxDets = [1, 10, max_detections]``. Without any detection every value is 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = [c["name"] for c in ground_truth["categories"]]
    out: dict[str, Any] = {
        "count": len(ground_truth["images"]),
        "objects": len(ground_truth["annotations"]),
        "detections": len(results),
    }
    if not results or not ground_truth["annotations"]:
        out.update({k: 0.0 for k in (*COCO_KEYS, *RECALL_KEYS)})
        counts = np.bincount(
            [a["category_id"] - 1 for a in ground_truth["annotations"]], minlength=len(classes)
        )
        out["per_class"] = {
            name: {"ap": 0.0, "ap50": 0.0, "objects": int(counts[k])}
            for k, name in enumerate(classes)
        }
        out["by_size"] = _by_size(ground_truth, out)
        out["pr_curve"] = None
        out["max_detections"] = max_detections
        return out
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        found = truth.loadRes(results)
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [float(v) for v in evaluation.stats]
    # -1 means "no object of that size": reported as None
    for key, value in zip((*COCO_KEYS, *RECALL_KEYS), stats, strict=True):
        out[key] = None if value < 0 else value
    precision = evaluation.eval["precision"]  # (iou, recall, class, area, maxDets)
    counts = np.bincount(
        [a["category_id"] - 1 for a in ground_truth["annotations"]], minlength=len(classes)
    )
    per_class = {}
    for k, name in enumerate(classes):
        per_class[name] = {
            "ap": _mean_valid(precision[:, :, k, 0, -1]),
            "ap50": _mean_valid(precision[0, :, k, 0, -1]),
            "objects": int(counts[k]),
        }
    out["per_class"] = per_class
    out["by_size"] = _by_size(ground_truth, out)
    # precision at each of COCO's 101 recall thresholds, averaged over the classes that have
    # objects (the curve whose area is AP50 / AP75)
    curve: dict[str, Any] = {"recall": [float(r) for r in evaluation.params.recThrs]}
    for name, iou in (("iou50", 0), ("iou75", 5)):
        curve[name] = [_mean_valid(precision[iou, r, :, 0, -1]) for r in range(precision.shape[1])]
    out["pr_curve"] = curve
    out["max_detections"] = max_detections
    return out


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean of COCOeval precision entries, leaving out -1 (nothing to measure)."""
    kept = values[values > -1]
    return float(kept.mean()) if kept.size else None


SIZE_AREAS = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}


def _by_size(ground_truth: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """COCO's object sizes (area < 32², < 96², larger): objects, AP and AR of each."""
    areas = [float(a["area"]) for a in ground_truth["annotations"]]
    return {
        size: {
            "objects": sum(low <= a < high for a in areas),
            "ap": metrics.get(f"ap_{size}"),
            "ar": metrics.get(f"ar_{size}"),
        }
        for size, (low, high) in SIZE_AREAS.items()
    }


def match_detections(
    truth_boxes: np.ndarray,
    truth_labels: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching as COCO does it at one IoU threshold: detections in descending score
    take the best-overlapping unmatched true box of their class. Returns (detection is a true
    positive, true box was found)."""
    found = np.zeros(len(boxes), dtype=bool)
    hit = np.zeros(len(truth_boxes), dtype=bool)
    if not len(boxes) or not len(truth_boxes):
        return found, hit
    overlaps = box_iou(
        torch.as_tensor(boxes, dtype=torch.float32),
        torch.as_tensor(truth_boxes, dtype=torch.float32),
    ).numpy()
    same = np.asarray(labels)[:, None] == np.asarray(truth_labels)[None, :]
    overlaps = np.where(same, overlaps, 0.0)
    for d in np.argsort(-np.asarray(scores), kind="stable"):
        candidates = np.where(hit, 0.0, overlaps[d])
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            found[d] = hit[best] = True
    return found, hit


__all__ = [
    "COCO_KEYS",
    "RECALL_KEYS",
    "Detections",
    "coco_boxes",
    "coco_ground_truth",
    "coco_metrics",
    "coco_results",
    "match_detections",
]

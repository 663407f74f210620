"""Evaluate a detection run: COCO AP by pycocotools on the store's boxes (docs/methods.md §4, §8).

Besides the metrics, the run folder gets the two files pycocotools read, so anyone can check
the numbers or compute others: ``detections-<split>.json`` (COCO results) and
``ground-truth-<split>.json`` (the COCO dataset built from the store's boxes, level-0 pixels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hiresctl.data import detection_images, require_images
from hiresctl.eval.common import result_header, save_result
from hiresctl.train import Run, coco_truth, load_run, predict_detections, resolve_device
from hiresctl.train.detection import (
    COCO_KEYS,
    PREDICT_SCORE_THRESHOLD,
    coco_boxes,
    coco_metrics,
    coco_results,
    match_detections,
)
from storage import Dataset


def evaluate_detection(
    run_dir: str | Path,
    data: str | Path,
    split: str = "test",
    device: str = "auto",
    checkpoint: str = "best",
    run: Run | None = None,
) -> dict[str, Any]:
    """COCO AP, AP50, AP75, APs/m/l, AR and per-class AP of ``run_dir``'s model on ``split``,
    with peak memory and images/s; written to ``RUN/eval-<split>.json`` beside the COCO files."""
    dataset = Dataset(data)
    torch_device = resolve_device(device)
    run = run or load_run(run_dir, dataset, torch_device, checkpoint)
    images, problems = detection_images(dataset, split, run.classes)
    require_images(images, dataset, split)
    found, stats = predict_detections(run, images)
    truth = coco_truth(run, images)
    results = coco_results(found)
    folder = Path(run_dir)
    (folder / f"ground-truth-{split}.json").write_text(json.dumps(truth))
    (folder / f"detections-{split}.json").write_text(json.dumps(results))
    metrics = coco_metrics(truth, results, run.recipe.max_detections)
    per_image = []
    for image, d, (true_boxes, true_labels) in zip(images, found, coco_boxes(truth), strict=True):
        # what a user of `hiresctl predict` would see: boxes scored ≥ its threshold, matched
        # at IoU 0.5
        keep = d["scores"].numpy() >= PREDICT_SCORE_THRESHOLD
        hits, found_truth = match_detections(true_boxes, true_labels, d["boxes"].numpy()[keep],
                                             d["scores"].numpy()[keep], d["labels"].numpy()[keep])  # fmt: skip
        per_image.append({"id": image.image_id, "objects": len(true_boxes),
                          "detections": len(d["scores"]), "shown": int(keep.sum()),
                          "found": int(found_truth.sum()), "missed": int((~found_truth).sum()),
                          "false_positives": int((~hits).sum()),
                          "recall": float(found_truth.mean()) if len(true_boxes) else None})  # fmt: skip
    result = result_header(run, run_dir, data, split, len(images), stats, torch_device)
    result.update({
        "metrics": {k: metrics[k] for k in (*COCO_KEYS, "ar")},
        "recall": {k: metrics.get(k) for k in ("ar1", "ar10", "ar", "ar_small", "ar_medium",
                                                "ar_large")},
        "per_class": metrics["per_class"],
        "by_size": metrics["by_size"],
        "pr_curve": metrics["pr_curve"],
        "matching": {"iou": 0.5, "score_threshold": PREDICT_SCORE_THRESHOLD,
                     "note": "per_image found/missed/false_positives: boxes scored at least "
                             "score_threshold, matched to true boxes of their class at IoU ≥ iou"},
        "objects": metrics["objects"],
        "detections": metrics["detections"],
        "max_detections": run.recipe.max_detections,
        "files": {"ground_truth": str(folder / f"ground-truth-{split}.json"),
                  "detections": str(folder / f"detections-{split}.json")},
        "per_image": per_image,
        "skipped": problems,
    })  # fmt: skip
    return save_result(run_dir, split, result)

"""Evaluate a detection run: COCO AP by pycocotools on the store's boxes (METHODS.md §4, §8).

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
from hiresctl.train.detection import COCO_KEYS, coco_metrics, coco_results
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
    for number, (image, d) in enumerate(zip(images, found, strict=True), start=1):
        objects = sum(a["image_id"] == number for a in truth["annotations"])
        confident = int((d["scores"] >= 0.5).sum()) if len(d["scores"]) else 0
        per_image.append({"id": image.image_id, "objects": objects,
                          "detections": len(d["scores"]), "confident": confident})  # fmt: skip
    result = result_header(run, run_dir, data, split, len(images), stats, torch_device)
    result.update({
        "metrics": {k: metrics[k] for k in (*COCO_KEYS, "ar")},
        "recall": {k: metrics.get(k) for k in ("ar1", "ar10", "ar", "ar_small", "ar_medium",
                                                "ar_large")},
        "per_class": metrics["per_class"],
        "objects": metrics["objects"],
        "detections": metrics["detections"],
        "max_detections": run.recipe.max_detections,
        "files": {"ground_truth": str(folder / f"ground-truth-{split}.json"),
                  "detections": str(folder / f"detections-{split}.json")},
        "per_image": per_image,
        "skipped": problems,
    })  # fmt: skip
    return save_result(run_dir, split, result)

"""What ``hiresctl predict`` writes for detection: COCO results (in the user's own image and
category ids where the store was tiled with ``--coco``) with their ground truth, QuPath rectangles
with the score as a measurement, and boxes in the image's CRS for georeferenced images."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hiresctl.data import LabelledImage
from hiresctl.eval import overlays
from hiresctl.eval.outputs import class_rgb
from hiresctl.train import (
    Run,
    coco_truth,
    predict_detections,
)
from storage import Dataset
from storage.annotations import geotransform


def box_features(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    transform: list[float] | None = None,
) -> list[dict[str, Any]]:
    """QuPath detections (GeoJSON features): one closed rectangle per box, in level-0 pixels
    or, given a GDAL geotransform, in its CRS."""
    features = []
    for (x0, y0, x1, y1), score, label in zip(
        boxes.tolist(), scores.tolist(), labels.tolist(), strict=True
    ):
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        if transform is not None:
            gx, sx, _, gy, _, sy = transform
            ring = [[gx + x * sx, gy + y * sy] for x, y in ring]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": classes[label], "color": class_rgb(label + 1)},
                    "measurements": {"score": round(float(score), 5)},
                },
            }
        )
    return features


def detect_images(
    run: Run,
    dataset: Dataset,
    entries: list[Any],
    out: Path,
    formats: set[str],
    on_image: Callable[[dict[str, Any]], None] | None,
    score_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Boxes of each image (batch by batch), written as COCO results, GeoJSON and overlays;
    boxes below ``score_threshold`` (default 0.2; 0.05 is what COCO evaluation keeps) are left
    out."""
    from hiresctl.train.detection.base import PREDICT_SCORE_THRESHOLD

    threshold = PREDICT_SCORE_THRESHOLD if score_threshold is None else score_threshold

    rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    ids = CocoIds(dataset, entries, run.classes)
    size = run.recipe.batch_size
    for start in range(0, len(entries), size):
        batch = entries[start : start + size]
        found, stats = predict_detections(run, [LabelledImage(e.id, 0) for e in batch])
        for entry, d in zip(batch, found, strict=True):
            keep = d["scores"] >= threshold
            boxes = d["boxes"][keep].numpy()
            scores, labels = d["scores"][keep].numpy(), d["labels"][keep].numpy()
            number = ids.image[entry.id]
            counts = np.bincount(labels, minlength=len(run.classes))
            row: dict[str, Any] = {
                "id": entry.id,
                "source": entry.source,
                "coco_image_id": number,
                "detections": len(boxes),
            }
            row.update({f"n_{name}": int(c) for name, c in zip(run.classes, counts, strict=True)})
            for box, score, label in zip(
                boxes.tolist(), scores.tolist(), labels.tolist(), strict=True
            ):
                results.append(
                    {
                        "image_id": number,
                        "category_id": ids.category[int(label)],
                        "bbox": [
                            round(box[0], 2),
                            round(box[1], 2),
                            round(box[2] - box[0], 2),
                            round(box[3] - box[1], 2),
                        ],
                        "score": round(float(score), 5),
                    }
                )
            if "geojson" in formats:
                folder = out / "geojson"
                folder.mkdir(parents=True, exist_ok=True)
                features = box_features(boxes, scores, labels, run.classes)
                path = folder / f"{entry.id}.geojson"
                path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
                row["geojson"] = str(path)
                geo = geotransform(entry.extra)
                if geo is not None:
                    transform, crs = geo
                    collection: dict[str, Any] = {
                        "type": "FeatureCollection",
                        "features": box_features(boxes, scores, labels, run.classes, transform),
                    }
                    if crs:
                        collection["crs"] = {"type": "name", "properties": {"name": crs}}
                    crs_path = folder / f"{entry.id}.crs.geojson"
                    crs_path.write_text(json.dumps(collection))
                    row["geojson_crs"] = str(crs_path)
            if "png" in formats:
                overlays.save_png(
                    out / "overlays" / f"{entry.id}.png",
                    overlays.boxes_overlay(
                        dataset.thumbnail(entry.id), entry.shape[1:], boxes, labels, class_rgb
                    ),
                )
            row["seconds"] = round(stats["seconds"] / len(batch), 3)
            row["peak_memory_gb"] = stats["peak_memory_gb"]
            rows.append(row)
            if on_image is not None:
                on_image(row)
    if "coco" in formats:
        (out / "detections.json").write_text(json.dumps(results))
        truth = ids.ground_truth(run)
        if truth["annotations"] or any(dataset.has_boxes(e.id) for e in entries):
            (out / "annotations.json").write_text(json.dumps(truth))
    return rows


class CocoIds:
    """The COCO ids predictions are written in: the user's own where the store was tiled from a
    COCO file (its ``images[].id`` and ``categories[].id``), else image ids 1..N in order and
    category ids 1..C in the run's class order. :meth:`ground_truth` is the store's boxes in the
    same ids, so ``COCO(annotations.json).loadRes(detections.json)`` scores the pair directly
    (and with a COCO file, the user's own file scores it the same way)."""

    def __init__(self, dataset: Dataset, entries: list[Any], classes: list[str]) -> None:
        self.dataset, self.entries, self.classes = dataset, entries, classes
        found = {e.id: dataset.coco_ids(e.id) for e in entries}
        names: dict[str, int] = {}
        for _, by_name in found.values():
            names.update(by_name)
        self.category = [names.get(name, i + 1) for i, name in enumerate(classes)]
        if len(set(self.category)) < len(self.category):  # ids that collide: use our own
            self.category = list(range(1, len(classes) + 1))
        used = {file_id for file_id, _ in found.values() if file_id is not None}
        self.image: dict[str, Any] = {}
        free = 1
        for entry in entries:
            file_id = found[entry.id][0]
            if file_id is None:
                while free in used:
                    free += 1
                file_id = free
                used.add(free)
            self.image[entry.id] = file_id

    def ground_truth(self, run: Run) -> dict[str, Any]:
        """The store's boxes as :func:`coco_truth` reads them, renumbered into these ids."""
        boxed = [e for e in self.entries if self.dataset.has_boxes(e.id)]
        truth = coco_truth(run, [LabelledImage(e.id, 0) for e in boxed])
        number = {i + 1: self.image[e.id] for i, e in enumerate(boxed)}
        images = [
            {
                "id": self.image[e.id],
                "file_name": Path(str(e.source)).name,
                "height": int(e.shape[1]),
                "width": int(e.shape[2]),
            }
            for e in self.entries
        ]
        annotations = [
            {
                **a,
                "image_id": number[a["image_id"]],
                "category_id": self.category[a["category_id"] - 1],
            }
            for a in truth["annotations"]
        ]
        categories = [
            {"id": c, "name": n} for c, n in zip(self.category, self.classes, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


__all__ = ["CocoIds", "box_features", "detect_images"]

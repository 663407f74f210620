"""What the report draws of each task's runs: the worst images with where a classifier looked,
segmentation overlays of the prediction on the truth (from the tiles evaluation predicted), and
detection boxes matched against the truth. One drawer per registered task."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiresctl.data import LabelledImage
from hiresctl.report import figures
from hiresctl.report.model import Figure, RunReport
from hiresctl.train import (
    Heatmap,
    Run,
    predict_images,
)
from storage import Dataset, StoreError

SHOWN = 6  # worst images shown per run
THUMB = 320  # longest side of a shown thumbnail
CROP = 192  # side of a full-resolution segmentation crop


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; None when it is missing, one line naming it when broken."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise StoreError(str(path), f"is not valid JSON ({exc.msg}, line {exc.lineno})") from None


# Per task: what the report draws of a run (the worst images, with where the model looked, or
# overlays of predictions on the truth); ``collector`` saw every tile evaluation predicted.
FigureDrawer = Callable[[RunReport, Run, Dataset, Path, "OverlayCollector"], None]
_DRAWERS: dict[str, FigureDrawer] = {}


def draws(task: str) -> Callable[[FigureDrawer], FigureDrawer]:
    """Decorator: ``task``'s figure drawer (one per registered task; a test checks it)."""

    def add(drawer: FigureDrawer) -> FigureDrawer:
        _DRAWERS[task] = drawer
        return drawer

    return add


def figure_drawer(task: str) -> FigureDrawer | None:
    return _DRAWERS.get(task)


@draws("cls")
def _classification_figures(
    report: RunReport, run: Run, dataset: Dataset, out: Path, collector: OverlayCollector
) -> None:
    rows = report.result["per_image"]
    worst = sorted(rows, key=lambda r: (r["correct"], r["p_target"]))[:SHOWN]
    images = [LabelledImage(r["id"], run.classes.index(r["target"])) for r in worst]
    maps: list[Heatmap] = []
    if images:  # every classification method explains its predictions
        predict_images(run, images, run.recipe.batch_size, heatmaps=maps)
    by_id = {m.image_id: m for m in maps}
    folder = Path("figures") / figures.slug(report.name)
    for row in worst:
        thumb = figures.to_rgb8(dataset.thumbnail(row["id"]))
        plain = figures.fit(thumb, THUMB)
        link = folder / f"{figures.slug(row['id'])}-thumbnail.png"
        figures.save_png(out / link, thumb)
        heat = by_id.get(row["id"])
        shown = plain
        if heat is not None:
            _, height, width = run.reader.shape(row["id"])
            shown = figures.heatmap_overlay(plain, heat.scores, heat.cell, (height, width))
        path = folder / f"{figures.slug(row['id'])}.png"
        png = figures.save_png(out / path, shown)
        verdict = "correct" if row["correct"] else "wrong"
        caption = (
            f"{row['id']}: true {row['target']}, predicted {row['predicted']} ({verdict}, "
            f"p(true) {row['p_target']:.2f})"
        )
        if heat is not None:
            caption += f"; {heat.kind}"
        report.shown.append(
            Figure(path.as_posix(), figures.data_uri(png), caption, link.as_posix())
        )
    classes = report.result["classes"]
    if len(classes) == 2 and rows:
        targets = np.array([classes.index(r["target"]) for r in rows])
        if len(set(targets.tolist())) == 2:
            scores = np.array([r["probabilities"][1] for r in rows])
            fpr, tpr, auc = figures.roc_curve(targets, scores)
            report.roc = {
                "fpr": fpr.tolist(),
                "tpr": tpr.tolist(),
                "auc": auc,
                "positive": classes[1],
            }


# -------------------------------------------------------------------------- segmentation


class OverlayCollector:
    """Sees every predicted tile during evaluation and keeps, per image, the prediction and the
    truth subsampled to ≤ ``THUMB`` pixels a side, and the ``CROP``² full-resolution window with
    the most wrong pixels: a few hundred KB whatever the image size."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.small: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self.crops: dict[str, tuple[int, int, int, np.ndarray, np.ndarray]] = {}

    def __call__(
        self,
        image_id: str,
        y: int,
        x: int,
        logits: torch.Tensor,
        pred: np.ndarray,
        truth: np.ndarray | None,
    ) -> None:
        if truth is None:
            return
        if image_id not in self.small:
            _, height, width = self.run.reader.shape(image_id)
            step = max(1, math.ceil(max(height, width) / THUMB))
            shape = (math.ceil(height / step), math.ceil(width / step))
            self.small[image_id] = (step, np.full(shape, -1), np.full(shape, -1))
        step, small_pred, small_truth = self.small[image_id]
        oy, ox = (-y) % step, (-x) % step
        sub_p, sub_t = pred[oy::step, ox::step], truth[oy::step, ox::step]
        ty, tx = (y + oy) // step, (x + ox) // step
        h = min(sub_p.shape[0], small_pred.shape[0] - ty)
        w = min(sub_p.shape[1], small_pred.shape[1] - tx)
        if h > 0 and w > 0:
            small_pred[ty : ty + h, tx : tx + w] = sub_p[:h, :w]
            small_truth[ty : ty + h, tx : tx + w] = sub_t[:h, :w]
        wrong = (pred != truth) & (truth >= 0)
        count = int(wrong.sum())
        if count and count > self.crops.get(image_id, (-1,))[0]:
            ys, xs = np.nonzero(wrong)
            cy = int(np.clip(ys.mean() - CROP // 2, 0, max(0, pred.shape[0] - CROP)))
            cx = int(np.clip(xs.mean() - CROP // 2, 0, max(0, pred.shape[1] - CROP)))
            self.crops[image_id] = (
                count,
                y + cy,
                x + cx,
                pred[cy : cy + CROP, cx : cx + CROP].copy(),
                truth[cy : cy + CROP, cx : cx + CROP].copy(),
            )


@draws("seg")
def _segmentation_figures(
    report: RunReport, run: Run, dataset: Dataset, out: Path, collector: OverlayCollector
) -> None:
    rows = report.result["per_image"]
    key = "f1" if len(run.classes) == 2 else "mean_iou"
    worst = sorted(rows, key=lambda r: r.get(key) if r.get(key) is not None else -1.0)[:SHOWN]
    folder = Path("figures") / figures.slug(report.name)
    for row in worst:
        image_id = row["id"]
        if image_id not in collector.small:
            continue
        _, small_pred, small_truth = collector.small[image_id]
        thumb = figures.to_rgb8(dataset.thumbnail(image_id))
        link = folder / f"{figures.slug(image_id)}-thumbnail.png"
        figures.save_png(out / link, thumb)
        base = figures.resize(thumb, small_pred.shape)
        overlay = figures.segmentation_overlay(base, small_pred, small_truth)
        path = folder / f"{figures.slug(image_id)}.png"
        png = figures.save_png(out / path, overlay)
        score = row.get(key)
        caption = f"{image_id}: {key} {score:.3f}" if score is not None else image_id
        report.shown.append(
            Figure(
                path.as_posix(),
                figures.data_uri(png),
                caption + " (green TP, red FP, blue FN)",
                link.as_posix(),
            )
        )
        if image_id in collector.crops:
            count, y, x, pred, truth = collector.crops[image_id]
            region = run.reader.read_region(image_id, y, x, CROP)
            pixels = figures.to_rgb8(np.asarray(region))[: pred.shape[0], : pred.shape[1]]
            crop = figures.segmentation_overlay(pixels, pred, truth)
            crop_path = folder / f"{figures.slug(image_id)}-crop.png"
            zoom = figures.resize(crop, (CROP * 2, CROP * 2), nearest=True)
            png = figures.save_png(out / crop_path, zoom)
            report.shown.append(
                Figure(
                    crop_path.as_posix(),
                    figures.data_uri(png),
                    f"{image_id}: full resolution at y={y}, x={x} ({count} wrong pixels in its tile)",
                )
            )


# ----------------------------------------------------------------------------- detection


def _coco_files(result: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Per image of the evaluation (in its order): (true boxes, labels) and (boxes, scores,
    labels) of the detections at or above the matching threshold, from the COCO files the
    evaluation wrote."""
    from hiresctl.train.detection.coco import coco_boxes

    truth = read_json(Path(result["files"]["ground_truth"]))
    found = read_json(Path(result["files"]["detections"])) or []
    threshold = result["matching"]["score_threshold"]
    kept = [d for d in found if d["score"] >= threshold]
    # results have the dataset's image ids: the same grouping gives boxes, labels and scores
    scores: list[list[float]] = [[] for _ in truth["images"]]
    for d in kept:
        scores[d["image_id"] - 1].append(d["score"])
    boxes = coco_boxes({"images": truth["images"], "annotations": kept})
    detections = [
        (b, np.asarray(s, np.float32), c) for (b, c), s in zip(boxes, scores, strict=True)
    ]
    return coco_boxes(truth), detections


def _focus(truth: np.ndarray, found: np.ndarray, boxes: np.ndarray, hits: np.ndarray) -> Any:
    """The box a zoomed crop centres on: the smallest missed object, else the smallest object,
    else the first false positive; None when the image has neither."""
    areas = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
    if (~found).any():
        missed = np.flatnonzero(~found)
        return truth[missed[areas[missed].argmin()]]
    if len(truth):
        return truth[areas.argmin()]
    if (~hits).any():
        return boxes[np.flatnonzero(~hits)[0]]
    return None


@draws("det")
def _detection_figures(
    report: RunReport, run: Run, dataset: Dataset, out: Path, collector: OverlayCollector
) -> None:
    """The worst images (lowest recall at IoU 0.5, then most false positives): boxes on the
    thumbnail and a full-resolution crop around the smallest object it missed."""
    from hiresctl.train.detection.coco import match_detections

    result = report.result
    rows = result["per_image"]
    truths, detections = _coco_files(result)
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            rows[i]["recall"] if rows[i]["recall"] is not None else 1.0,
            -rows[i]["false_positives"],
        ),
    )
    folder = Path("figures") / figures.slug(report.name)
    for i in order[:SHOWN]:
        row = rows[i]
        image_id = row["id"]
        (truth, truth_labels), (boxes, scores, labels) = truths[i], detections[i]
        hits, found = match_detections(truth, truth_labels, boxes, scores, labels)
        thumb = figures.to_rgb8(dataset.thumbnail(image_id))
        link = folder / f"{figures.slug(image_id)}-thumbnail.png"
        figures.save_png(out / link, thumb)
        plain = figures.fit(thumb, THUMB)
        _, height, width = dataset.entry(image_id).shape
        scale = (plain.shape[0] / height, plain.shape[1] / width)
        shown = figures.detection_overlay(plain, scale, (0, 0), truth, found, boxes, hits)
        path = folder / f"{figures.slug(image_id)}.png"
        png = figures.save_png(out / path, shown)
        caption = (
            f"{image_id}: found {row['found']} of {row['objects']} objects, "
            f"{row['false_positives']} false positives (boxes scored ≥ "
            f"{result['matching']['score_threshold']}, IoU ≥ 0.5)"
        )
        report.shown.append(
            Figure(path.as_posix(), figures.data_uri(png), caption, link.as_posix())
        )
        focus = _focus(truth, found, boxes, hits)
        if focus is None:
            continue
        # the crop is read at the run's level; boxes stay in level-0 pixels
        _, read_h, _ = run.reader.shape(image_id)
        ratio = read_h / height
        cx, cy = (focus[0] + focus[2]) / 2, (focus[1] + focus[3]) / 2
        side = CROP / ratio  # level-0 pixels the crop spans
        x0 = float(np.clip(cx - side / 2, 0, max(0.0, width - side)))
        y0 = float(np.clip(cy - side / 2, 0, max(0.0, height - side)))
        region = run.reader.read_region(image_id, round(y0 * ratio), round(x0 * ratio), CROP)
        zoom = 2
        pixels = figures.resize(
            figures.to_rgb8(np.asarray(region)), (CROP * zoom, CROP * zoom), nearest=True
        )
        crop = figures.detection_overlay(
            pixels, (ratio * zoom, ratio * zoom), (y0, x0), truth, found, boxes, hits, thickness=2
        )
        crop_path = folder / f"{figures.slug(image_id)}-crop.png"
        png = figures.save_png(out / crop_path, crop)
        size = f"{focus[2] - focus[0]:.0f}×{focus[3] - focus[1]:.0f} px"
        report.shown.append(
            Figure(
                crop_path.as_posix(),
                figures.data_uri(png),
                f"{image_id}: ×{zoom} zoom at x={x0:.0f}, y={y0:.0f} around a {size} object",
            )
        )


__all__ = ["FigureDrawer", "OverlayCollector", "draws", "figure_drawer", "read_json"]

"""What ``hiresctl predict`` writes for each task (see ``predict.py`` for the folder): the
predictions store (label pyramids, heatmaps), overlays, QuPath GeoJSON polygons and boxes, COCO
results and their ground truth (``boxes.py``), each image's row; written tile by tile."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from hiresctl.data import LabelledImage
from hiresctl.eval import overlays
from hiresctl.train import (
    Heatmap,
    Run,
    inference_device,
    load_run,
    predict_images,
    predict_segmentation,
)
from hiresctl.train.segmentation import SegmentationMethod
from hiresctl.train.segmentation.base import PREDICT_TILE
from hiresctl.train.segmentation.metrics import binary_image_metrics
from storage import Dataset, StoreError, UsageError
from storage.ngff import PALETTE, label_image_attrs, label_pyramid
from storage.store import hires_attrs, image_multiscales

STORE = "predictions.zarr"
GEOJSON_MAX_SIDE = 8192  # polygons are traced on the finest prediction level at most this big


def open_out(out: str | Path, meta: dict[str, Any]) -> zarr.Group:
    """The predictions store at ``out``, created or reopened. Ranks of one torchrun job open it
    one at a time (a lock on its folder) and rewrite its attributes only when they differ, so
    none reads a half-written root; each then writes its own images' groups."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{out}: --out exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        root = zarr.open_group(str(out), mode="a")
        existing = hires_attrs(root)
        if existing and existing.get("kind") != "predictions":
            raise StoreError(str(out), "is a Zarr group but not a hiresctl predictions store")
        if not existing and len(list(root.keys())):
            raise StoreError(str(out), "is a Zarr group with other content; choose another --out")
        record = json.loads(json.dumps({**meta, "kind": "predictions"}))
        if existing != record:
            root.attrs["hiresctl"] = record
    return root


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder``, waited for."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def predict_masks(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    split: str | None = None,
    device: str = "auto",
    checkpoint: str = "best",
    probabilities: bool = False,
    on_image: Callable[[dict[str, Any]], None] | None = None,
    screen: Callable[[Run, Dataset, list[Any]], list[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Predict every complete image of ``data`` (or of ``split``) with a segmentation run;
    ``screen`` keeps the images the run can take (``PredictJob.screen``)."""
    dataset = Dataset(data)
    torch_device = inference_device(device)
    run = load_run(run_dir, dataset, torch_device, checkpoint)
    if not isinstance(run.method, SegmentationMethod) or run.mask_values is None:
        raise UsageError(f"{run_dir}: a {run.recipe.task} run; predict writes masks of seg runs")
    values = np.asarray(run.mask_values)
    classes = dict(zip(run.mask_values, run.classes, strict=True))
    root = open_out(
        out,
        {
            "run": str(run_dir),
            "data": str(data),
            "task": "seg",
            "method": run.recipe.method,
            "classes": classes,
        },
    )
    entries = [e for e in dataset.entries(split=split) if e.complete]
    if not entries:
        raise StoreError(
            dataset.path, f"no completely tiled images{f' in split {split!r}' if split else ''}"
        )
    if screen is not None:
        entries = screen(run, dataset, entries)
    chunk = math.gcd(run.recipe.patch_size, PREDICT_TILE)
    while chunk > 512:
        chunk //= 2
    dtype = np.uint8 if values.max() < 256 else np.uint16
    results = []
    for entry in entries:
        started = time.perf_counter()
        if entry.id in root:  # redone: the run or the data may have changed since
            del root[entry.id]
        group = root.create_group(entry.id)
        group.attrs["hiresctl"] = {"status": "incomplete", "source": entry.source}
        _, height, width = run.reader.shape(entry.id)
        level0 = group.create_array(
            "0",
            shape=(1, height, width),
            dtype=dtype,
            chunks=(1, chunk, chunk),
            fill_value=0,
            dimension_names=("c", "y", "x"),
            compressors=[ZstdCodec(level=3)],
        )
        outputs = 1 if len(run.classes) == 2 else len(run.classes)
        probs = None
        if probabilities:
            probs = group.create_array(
                "probabilities",
                shape=(outputs, height, width),
                dtype="float16",
                chunks=(outputs, chunk, chunk),
                fill_value=0,
                dimension_names=("c", "y", "x"),
                compressors=[ZstdCodec(level=3)],
            )

        counts = np.zeros(len(values), dtype=np.int64)

        def write(
            image_id: str,
            y: int,
            x: int,
            logits: torch.Tensor,
            pred: np.ndarray,
            truth: np.ndarray | None,
            level0: Any = level0,
            probs: Any = probs,
            counts: np.ndarray = counts,
            bottom: int = height,
            right: int = width,
        ) -> None:
            h, w = pred.shape
            inside = pred[: max(0, min(h, bottom - y)), : max(0, min(w, right - x))]
            counts += np.bincount(inside.ravel(), minlength=len(values))[: len(values)]
            level0[0, y : y + h, x : x + w] = values[pred].astype(dtype)
            if probs is not None:
                p = logits.sigmoid() if logits.shape[0] == 1 else logits.softmax(0)
                probs[:, y : y + h, x : x + w] = p.numpy().astype(np.float16)

        has_mask = bool(entry.mask)
        [matrix], stats = predict_segmentation(
            run, [LabelledImage(entry.id, 0)], on_tile=write, with_targets=has_mask
        )
        shapes = label_pyramid(group, thumbnail=1024)
        scales = [(height / h, width / w) for h, w in shapes]
        source = f"{Path(data).resolve()}/images/{entry.id}"
        group.attrs["ome"] = label_image_attrs(
            "prediction", scales, entry.mpp, run.mask_values, classes, source=source
        )
        row: dict[str, Any] = {
            "id": entry.id,
            "source": entry.source,
            "shape": [height, width],
            "levels": len(shapes),
            "output": f"{out}/{entry.id}",
        }
        row["pixels"] = {name: int(c) for name, c in zip(run.classes, counts, strict=True)}
        if has_mask and len(run.classes) == 2:
            row.update(
                {
                    k: (v if np.isfinite(v) else None)
                    for k, v in binary_image_metrics(matrix).items()
                }
            )
        row["seconds"] = round(time.perf_counter() - started, 3)
        row["peak_memory_gb"] = stats["peak_memory_gb"]
        group.attrs["hiresctl"] = {"status": "complete", **row}  # completion is the last write
        results.append(row)
        if on_image is not None:
            on_image(row)
    return results


# ------------------------------------------------------------------------ classification


def _heatmap_image(
    group: zarr.Group, heat: Heatmap, scale: tuple[float, float], mpp: float | None
) -> None:
    """A one-level float32 NGFF image of a heatmap; ``scale``: level-0 pixels per cell."""
    rows, cols = heat.scores.shape
    array = group.create_array(
        "0",
        shape=(1, rows, cols),
        dtype="float32",
        chunks=(1, rows, cols),
        fill_value=0,
        dimension_names=("c", "y", "x"),
    )
    array[0] = heat.scores
    group.attrs["ome"] = image_multiscales("heatmap", [scale], mpp)


def classify_images(
    run: Run,
    dataset: Dataset,
    entries: list[Any],
    root: zarr.Group | None,
    out: Path,
    formats: set[str],
    on_image: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """Predict each image's class and where the model looked (batch by batch)."""
    rows = []
    size = run.recipe.batch_size
    for start in range(0, len(entries), size):
        batch = entries[start : start + size]
        began = time.perf_counter()
        maps: list[Heatmap] = []
        images = [LabelledImage(e.id, 0) for e in batch]  # every cls method explains itself
        logits, _, stats = predict_images(run, images, size, heatmaps=maps)
        by_id = {m.image_id: m for m in maps}
        seconds = (time.perf_counter() - began) / len(batch)
        for entry, scores in zip(batch, logits.softmax(1), strict=True):
            best = int(scores.argmax())
            row: dict[str, Any] = {
                "id": entry.id,
                "source": entry.source,
                "predicted": run.classes[best],
                "confidence": round(float(scores[best]), 6),
            }
            row.update(
                {
                    f"p_{name}": round(float(v), 6)
                    for name, v in zip(run.classes, scores, strict=True)
                }
            )
            if entry.label is not None:
                row["label"] = entry.label
                row["correct"] = entry.label == run.classes[best]
            heat = by_id.get(entry.id)
            _, height, width = run.reader.shape(entry.id)
            _, h0, w0 = entry.shape
            if heat is not None:
                row["heatmap"] = heat.kind
                if root is not None:
                    if entry.id in root:
                        del root[entry.id]
                    group = root.create_group(entry.id)
                    group.attrs["hiresctl"] = {"status": "incomplete", "source": entry.source}
                    cell = (heat.cell * h0 / height, heat.cell * w0 / width)
                    _heatmap_image(group, heat, cell, entry.mpp)
                    group.attrs["hiresctl"] = {"status": "complete", **row}
                    row["output"] = f"{out / STORE}/{entry.id}"
                if "png" in formats:
                    thumb = overlays.fit(overlays.to_rgb8(dataset.thumbnail(entry.id)), 512)
                    overlay = overlays.heatmap_overlay(
                        thumb, heat.scores, heat.cell, (height, width)
                    )
                    overlays.save_png(out / "overlays" / f"{entry.id}.png", overlay)
            row["seconds"] = round(seconds, 3)
            row["peak_memory_gb"] = stats["peak_memory_gb"]
            rows.append(row)
            if on_image is not None:
                on_image(row)
    return rows


# -------------------------------------------------------------------------- segmentation


def class_rgb(value_index: int) -> list[int]:
    """The colour of class ``value_index`` in QuPath files (the label palette; grey for 0)."""
    colour = PALETTE[value_index % len(PALETTE)]
    return list(colour[:3]) if value_index else [128, 128, 128]


def mask_polygons(
    labels: np.ndarray,
    values: list[int],
    names: dict[int, str],
    scale: tuple[float, float],
    offset: tuple[float, float] = (0.0, 0.0),
) -> list[dict[str, Any]]:
    """GeoJSON Features (QuPath annotations) of every non-background class region of a
    (h, w) mask of ``values``: outer rings with their holes, in pixel coordinates multiplied by
    ``scale`` (y, x) and shifted by ``offset``. Value index 0 is the background.

    Rings are traced by marching squares between pixel centres (a region's pixels 4-connected,
    the background 8-connected), so every ring is simple and no two rings touch: valid polygons
    by construction, as QuPath 0.6 (JTS) requires: pixel-centre contours of one-pixel-wide or
    diagonally touching regions self-intersect, which QuPath 0.5 tolerated and 0.6 refuses. A
    pixel belongs to a polygon exactly when its centre is inside it. Exterior rings run
    counter-clockwise in (x, y), holes clockwise (RFC 7946's right-hand rule)."""
    import cv2
    from skimage.measure import find_contours

    features = []
    for index, value in enumerate(values):
        if index == 0:
            continue
        binary = np.pad(labels == value, 1).astype(np.float32)  # padding closes every ring
        if not binary.any():
            continue
        outers: list[np.ndarray] = []
        holes: list[np.ndarray] = []
        for contour in find_contours(
            binary, 0.5, fully_connected="low", positive_orientation="high"
        ):
            xy = _corners(contour[:-1, ::-1] - 1.0)  # (row, col) → (x, y), padding removed
            if len(xy) < 3:
                continue
            # marching squares winds around regions one way and around holes the other
            (outers if _signed_area(xy) < 0 else holes).append(xy)
        rings: list[list[np.ndarray]] = [[outer[::-1]] for outer in outers]  # → counter-clockwise
        for hole in holes:
            x, y = hole[0]
            for group, outer in zip(rings, outers, strict=True):
                if cv2.pointPolygonTest(outer.astype(np.float32), (float(x), float(y)), False) > 0:
                    group.append(hole[::-1])  # → clockwise
                    break

        def position(ring: np.ndarray) -> list[list[float]]:
            points = [
                [
                    round((float(x) + 0.5) * scale[1] + offset[1], 2),
                    round((float(y) + 0.5) * scale[0] + offset[0], 2),
                ]
                for x, y in ring
            ]
            return [*points, points[0]]

        for group in rings:
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [position(r) for r in group]},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {
                            "name": names.get(value, str(value)),
                            "color": class_rgb(index),
                        },
                        "value": int(value),
                    },
                }
            )
    return features


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _corners(xy: np.ndarray) -> np.ndarray:
    """A closed ring (last point not repeated) without the points where it runs straight on."""
    before, after = xy - np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0) - xy
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return xy[np.abs(turn) > 1e-9]


def segmentation_outputs(
    root: zarr.Group,
    dataset: Dataset,
    row: dict[str, Any],
    values: list[int],
    names: dict[int, str],
    out: Path,
    formats: set[str],
) -> None:
    """GeoJSON polygons and the PNG overlay of one predicted image, from its label pyramid."""
    group: Any = root[row["id"]]
    levels = [group[str(i)] for i in range(row["levels"])]
    _, h0, w0 = dataset.entry(row["id"]).shape
    if "geojson" in formats:
        chosen = next((a for a in levels if max(a.shape[1:]) <= GEOJSON_MAX_SIDE), levels[-1])
        _, h, w = chosen.shape
        features = mask_polygons(np.asarray(chosen[0]), values, names, (h0 / h, w0 / w))
        path = out / "geojson" / f"{row['id']}.geojson"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        row["geojson"] = str(path)
        row["polygons"] = len(features)
    if "png" in formats:
        small = np.asarray(levels[-1][0])
        thumb = overlays.to_rgb8(dataset.thumbnail(row["id"]))
        base = overlays.resize(thumb, small.shape).astype(np.float32)
        for index, value in enumerate(values):
            if index:
                where = small == value
                base[where] = base[where] * 0.4 + np.asarray(class_rgb(index), np.float32) * 0.6
        overlays.save_png(out / "overlays" / f"{row['id']}.png", base.astype(np.uint8))


__all__ = [
    "STORE",
    "classify_images",
    "mask_polygons",
    "open_out",
    "predict_masks",
    "segmentation_outputs",
]

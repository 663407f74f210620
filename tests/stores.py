"""Tiny dataset stores built through the real tiler, for data and training tests."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from storage.annotations import Annotations
from storage.tiler import LabelTable, MaskSet, SourceSpec, TileOptions, tile


def make_store(
    root: Path,
    images: dict[str, np.ndarray],
    labels: dict[str, tuple[str, str]] | None = None,
    chunk: int = 32,
    thumbnail_size: int = 64,
    masks: dict[str, np.ndarray] | None = None,
    coco: dict[str, object] | None = None,
) -> Path:
    """Write ``images`` (name → (h, w, c) uint8) as TIFFs and tile them into ``root/ds.zarr``.

    ``labels`` maps name → (label, split); ``masks`` name → (h, w) uint8 label image;
    ``coco`` a COCO detection dict whose file names are ``<name>.tif``.
    """
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    for name, pixels in images.items():
        tifffile.imwrite(
            sources / f"{name}.tif", pixels, photometric="rgb" if pixels.shape[-1] == 3 else None
        )
    table = None
    if labels:
        csv_path = root / "labels.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", "label", "split"])
            for name, (label, split) in labels.items():
                writer.writerow([f"{name}.tif", label, split])
        table = LabelTable(csv_path)
    mask_set = None
    if masks:
        (root / "masks").mkdir(exist_ok=True)
        for name, mask in masks.items():
            tifffile.imwrite(root / "masks" / f"{name}.tif", mask)
        mask_set = MaskSet(root / "masks")
    boxes = None
    if coco is not None:
        (root / "coco.json").write_text(json.dumps(coco))
        boxes = Annotations.coco(root / "coco.json")
    out = root / "ds.zarr"
    specs = [SourceSpec((str(sources / f"{name}.tif"),)) for name in images]
    results = tile(
        specs,
        out,
        TileOptions(chunk=chunk, thumbnail_size=thumbnail_size, workers=1),
        table,
        masks=mask_set,
        annotations=boxes,
    )
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"tiling failed: {[r.error for r in failed]}")
    return out


def planted_images(
    count: int,
    side: int,
    patch: int,
    seed: int,
    split_of: Callable[[int], str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]]]:
    """Binary task: class 1 images carry one bright square in one random patch, class 0 none.

    The square is small against the image, so a downsampled view loses most of it.
    """
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for i in range(count):
        pixels = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
        label = i % 2
        if label:
            cells = side // patch
            r, c = rng.integers(0, cells, 2)
            y, x = r * patch + patch // 4, c * patch + patch // 4
            pixels[y : y + patch // 2, x : x + patch // 2] = 255
        name = f"im{i:03d}"
        images[name] = pixels
        labels[name] = (str(label), split_of(i) if split_of else "train")
    return images, labels


def planted_objects(
    count: int,
    side: int,
    seed: int,
    split_of: Callable[[int], str] | None = None,
    per_image: int = 3,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]], dict[str, object]]:
    """Detection: ``per_image`` red or green squares of 20–40 px (classes "red", "green") on
    dark noise, never overlapping; returns images, labels (for splits) and the COCO dict."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    coco_images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for i in range(count):
        pixels = rng.integers(30, 60, (side, side, 3), dtype=np.uint8)
        placed: list[tuple[int, int, int]] = []
        for _ in range(per_image):
            for _attempt in range(100):
                s = int(rng.integers(20, 41))
                y, x = (int(v) for v in rng.integers(0, side - s, 2))
                if all(
                    x + s <= px or px + ps <= x or y + s <= py or py + ps <= y
                    for py, px, ps in placed
                ):
                    break
            else:
                continue
            placed.append((y, x, s))
            category = int(rng.integers(0, 2))
            pixels[y : y + s, x : x + s] = (230, 60, 60) if category == 0 else (60, 230, 60)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category + 1,
                    "bbox": [x, y, s, s],
                    "area": s * s,
                    "iscrowd": 0,
                }
            )
        name = f"ob{i:03d}"
        images[name] = pixels
        labels[name] = ("objects", split_of(i) if split_of else "train")
        coco_images.append({"id": i + 1, "file_name": f"{name}.tif", "width": side, "height": side})
    coco = {
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}],
    }
    return images, labels, coco

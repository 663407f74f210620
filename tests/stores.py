"""Tiny dataset stores built through the real tiler, for data and training tests."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from storage.tiler import LabelTable, MaskSet, SourceSpec, TileOptions, tile


def make_store(
    root: Path,
    images: dict[str, np.ndarray],
    labels: dict[str, tuple[str, str]] | None = None,
    chunk: int = 32,
    thumbnail_size: int = 64,
    masks: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``images`` (name → (h, w, c) uint8) as TIFFs and tile them into ``root/ds.zarr``.

    ``labels`` maps name → (label, split); ``masks`` name → (h, w) uint8 label image.
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
    out = root / "ds.zarr"
    specs = [SourceSpec((str(sources / f"{name}.tif"),)) for name in images]
    results = tile(
        specs, out, TileOptions(chunk=chunk, thumbnail_size=thumbnail_size, workers=1), table,
        masks=mask_set,
    )  # fmt: skip
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

"""``hiresctl predict`` for segmentation: whole-image masks written as OME-NGFF label images,
tile by tile, so a gigapixel prediction never exists as one in-memory array.

Output: a Zarr v3 group ``OUT`` with one NGFF multiscale label image per image at ``OUT/<id>``
(levels 0, 1, … by 2×2 mode, ``image-label`` colours and class names, mask values as in the
training masks) and, with ``probabilities``, ``OUT/<id>/probabilities`` (float16, one channel
per output: the foreground probability for binary runs, else the class probabilities).
An image is marked ``complete`` last; a rerun redoes incomplete images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from hiresctl.data import LabelledImage
from hiresctl.train import load_run, predict_segmentation, resolve_device
from hiresctl.train.segmentation import PREDICT_TILE, binary_image_metrics
from storage import Dataset, StoreError, UsageError
from storage.store import hires_attrs
from storage.tiler import label_image_attrs, label_pyramid


def _open_out(out: str | Path, meta: dict[str, Any]) -> zarr.Group:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{out}: --out exists and is not a folder")
    root = zarr.open_group(str(out), mode="a")
    existing = hires_attrs(root)
    if existing and existing.get("kind") != "predictions":
        raise StoreError(str(out), "is a Zarr group but not a hiresctl predictions store")
    if not existing and len(list(root.keys())):
        raise StoreError(str(out), "is a Zarr group with other content; choose another --out")
    root.attrs["hiresctl"] = {**meta, "kind": "predictions"}
    return root


def predict_masks(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    split: str | None = None,
    device: str = "auto",
    checkpoint: str = "best",
    probabilities: bool = False,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Predict every complete image of ``data`` (or of ``split``) with a segmentation run."""
    dataset = Dataset(data)
    torch_device = resolve_device(device)
    run = load_run(run_dir, dataset, torch_device, checkpoint)
    if run.recipe.task != "seg" or run.mask_values is None:
        raise UsageError(f"{run_dir}: a {run.recipe.task} run; predict writes masks of seg runs")
    values = np.asarray(run.mask_values)
    classes = dict(zip(run.mask_values, run.classes, strict=True))
    root = _open_out(out, {"run": str(run_dir), "data": str(data), "task": "seg",
                           "method": run.recipe.method, "classes": classes})  # fmt: skip
    entries = [e for e in dataset.entries(split=split) if e.complete]
    if not entries:
        raise StoreError(
            dataset.path, f"no completely tiled images{f' in split {split!r}' if split else ''}"
        )
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
            "0", shape=(1, height, width), dtype=dtype, chunks=(1, chunk, chunk), fill_value=0,
            dimension_names=("c", "y", "x"), compressors=[ZstdCodec(level=3)],
        )  # fmt: skip
        outputs = 1 if len(run.classes) == 2 else len(run.classes)
        probs = None
        if probabilities:
            probs = group.create_array(
                "probabilities", shape=(outputs, height, width), dtype="float16",
                chunks=(outputs, chunk, chunk), fill_value=0, dimension_names=("c", "y", "x"),
                compressors=[ZstdCodec(level=3)],
            )  # fmt: skip

        def write(
            image_id: str, y: int, x: int, logits: torch.Tensor, pred: np.ndarray,
            truth: np.ndarray | None, level0: Any = level0, probs: Any = probs,
        ) -> None:  # fmt: skip
            h, w = pred.shape
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
        group.attrs["ome"] = label_image_attrs("prediction", scales, entry.mpp,
                                               run.mask_values, classes, source)  # fmt: skip
        row: dict[str, Any] = {"id": entry.id, "source": entry.source, "shape": [height, width],
                               "levels": len(shapes), "output": f"{out}/{entry.id}"}  # fmt: skip
        if has_mask and len(run.classes) == 2:
            row.update({k: (v if np.isfinite(v) else None)
                        for k, v in binary_image_metrics(matrix).items()})  # fmt: skip
        row["seconds"] = round(time.perf_counter() - started, 3)
        row["peak_memory_gb"] = stats["peak_memory_gb"]
        group.attrs["hiresctl"] = {"status": "complete", **row}  # completion is the last write
        results.append(row)
        if on_image is not None:
            on_image(row)
    return results

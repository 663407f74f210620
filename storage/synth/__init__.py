"""Synthetic benchmark images, built from data that packages ship or that the user gives.

Digits come from real MNIST when the user points ``--mnist DIR`` at its four IDX files
(``storage.mnist``; nothing is downloaded): training images draw MNIST's training digits,
validation and test images its test digits. Without it, the offline default is scikit-learn's
bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 samples of 8x8, upscaled),
70% of the samples for training images and the rest for the others. Either way no digit sample
appears on both sides of a split.

Each synthesizer writes ``OUT/images/*.tiff`` (tiled, deflate) and ``OUT/labels.csv``
(``source,label,split``) ready for ``hiresctl tile``; segmentation kinds also write
``OUT/masks/*.tiff`` and ``OUT/classes.csv`` for ``--masks`` and ``--mask-classes``; detection
kinds write ``OUT/annotations.json`` (COCO); plus ``OUT/synth.json`` with everything
needed to check the labels (digit positions, values, scales). Output is a function of the seed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.errors import UsageError
from storage.synth.common import SPLIT_FRACTIONS
from storage.synth.digits import fine_detail, megapixel_mnist, ultramnist
from storage.synth.scenes import det_mosaic, seg_aerial, seg_vessels, sparse_slide

__all__ = ["SPLIT_FRACTIONS", "SYNTHESIZERS", "synthesize"]

MAX_SIDE = 32768
Synthesizer = Callable[..., list[dict[str, Any]]]

SYNTHESIZERS: dict[str, tuple[Synthesizer, int]] = {
    "det-mosaic": (det_mosaic, 4096),
    "ultramnist": (ultramnist, 4096),
    "megapixel-mnist": (megapixel_mnist, 1500),
    "fine-detail": (fine_detail, 512),
    "sparse-slide": (sparse_slide, 2048),
    "seg-vessels": (seg_vessels, 4096),
    "seg-aerial": (seg_aerial, 4096),
}


def synthesize(
    kind: str,
    out: str | Path,
    count: int = 16,
    size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Write ``count`` images of ``kind`` and their labels into ``out``; returns the labels CSV."""
    if kind not in SYNTHESIZERS:
        raise UsageError(f"unknown synthesizer {kind!r}; valid: {', '.join(sorted(SYNTHESIZERS))}")
    func, default_size = SYNTHESIZERS[kind]
    size = size or default_size
    if not 64 <= size <= MAX_SIDE:
        raise UsageError(f"--size must be between 64 and {MAX_SIDE}, got {size}")
    if count < 1:
        raise UsageError(f"--count must be ≥ 1, got {count}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = func(out, count=count, size=size, seed=seed, **options)
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "label", "split"])
        for row in rows:
            writer.writerow([row["source"], row["label"], row["split"]])
    meta = {
        "kind": kind,
        "count": count,
        "size": size,
        "seed": seed,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        "digits": f"MNIST IDX files in {options['mnist']}"
        if options.get("mnist")
        else "scikit-learn load_digits (8x8, upscaled)",
        "images": rows,
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=1))
    return labels

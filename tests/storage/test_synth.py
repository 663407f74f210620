"""Synthesizers: reproducible by seed, labels that match what was drawn."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from storage.errors import UsageError
from storage.synth import synthesize


def test_ultramnist_labels_are_digit_sums_and_boxes_do_not_overlap(tmp_path: Path) -> None:
    synthesize("ultramnist", tmp_path, count=8, size=512, seed=3)
    meta = json.loads((tmp_path / "synth.json").read_text())
    for row in meta["images"]:
        digits = [o["digit"] for o in row["objects"]]
        assert 3 <= len(digits) <= 5 and row["label"] == sum(digits) and row["label"] < 28
        boxes = [o["box"] for o in row["objects"]]
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1 :]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
        image = tifffile.imread(tmp_path / "images" / row["source"])
        assert image.shape == (512, 512)
        x, y, w, h = boxes[0]
        assert image[y : y + h, x : x + w].max() > 100  # the digit is drawn where recorded
    assert [r["split"] for r in meta["images"]].count("test") >= 1


def test_same_seed_same_images(tmp_path: Path) -> None:
    for name in ("a", "b"):
        synthesize("megapixel-mnist", tmp_path / name, count=2, size=300, seed=7)
    for f in ("megapixel_mnist_00000.tiff", "megapixel_mnist_00001.tiff"):
        np.testing.assert_array_equal(
            tifffile.imread(tmp_path / "a" / "images" / f),
            tifffile.imread(tmp_path / "b" / "images" / f),
        )
    synthesize("megapixel-mnist", tmp_path / "c", count=1, size=300, seed=8)
    assert not np.array_equal(
        tifffile.imread(tmp_path / "a/images/megapixel_mnist_00000.tiff"),
        tifffile.imread(tmp_path / "c/images/megapixel_mnist_00000.tiff"),
    )


def test_megapixel_mnist_tasks(tmp_path: Path) -> None:
    synthesize("megapixel-mnist", tmp_path, count=4, size=300, seed=1, task="max")
    meta = json.loads((tmp_path / "synth.json").read_text())
    for row in meta["images"]:
        digits = [o["digit"] for o in row["objects"]]
        values, counts = np.unique(digits, return_counts=True)
        assert row["labels"]["majority"] == values[counts.argmax()] and counts.max() == 3
        assert row["label"] == max(digits)


def test_unknown_kind_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="valid: fine-detail, megapixel-mnist, ultramnist"):
        synthesize("mnist", tmp_path)


def test_fine_detail_differs_only_at_full_resolution(tmp_path: Path) -> None:
    labels = synthesize("fine-detail", tmp_path / "fd", count=10, size=128, seed=1)
    rows = list(csv.DictReader(labels.open()))
    assert [r["label"] for r in rows] == ["0", "1"] * 5
    meta = json.loads((tmp_path / "fd" / "synth.json").read_text())
    for row, image in zip(rows, meta["images"], strict=True):
        x, y, side, _ = image["objects"][0]["box"]
        pixels = tifffile.imread(tmp_path / "fd" / "images" / row["source"])
        region = pixels[y : y + side, x : x + side, 0].astype(float)
        halved = region.reshape(side // 2, 2, side // 2, 2).mean(axis=(1, 3))
        assert np.all(halved == 90.0)  # identical for both classes after 2× downsampling
        assert (region.std() > 80) == (row["label"] == "1")  # different at full resolution

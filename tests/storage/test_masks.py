"""Segmentation masks are tiled beside their images as exact, mode-downsampled NGFF labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from storage.errors import UsageError
from storage.pyramid import halve_mode, level_shapes
from storage.store import Dataset
from storage.tiler import MaskSet, SourceSpec, TileOptions, tile
from tests.conftest import coord_pixels
from tests.ngff import assert_labels_have_parents, assert_valid_ngff

SMALL = TileOptions(chunk=32, block_size=64, thumbnail_size=64, workers=1)


def _pair(folder: Path, name: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """An image ``name.tif`` in folder/src and a random 0..3 mask ``name_mask.png`` in
    folder/masks; returns the mask."""
    (folder / "src").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    tifffile.imwrite(folder / "src" / f"{name}.tif", coord_pixels(height, width), photometric="rgb")
    mask = np.random.default_rng(seed).integers(0, 4, (height, width), dtype=np.uint8)
    Image.fromarray(mask).save(folder / "masks" / f"{name}_mask.png")
    return mask


def test_halve_mode_takes_the_majority_and_never_mixes_values() -> None:
    block = np.array([[[1, 1, 3, 0], [1, 3, 1, 3]]], dtype=np.uint8)
    # left 2x2: 1,1,1,3 → 1; right: 3,0,1,3 → 3 (a mean would give 2, a value never present)
    np.testing.assert_array_equal(halve_mode(block), [[[1, 3]]])
    tie = np.array([[[2, 5], [5, 2]]], dtype=np.uint8)
    assert halve_mode(tie)[0, 0, 0] == 2  # ties go to the top-left value
    odd = np.arange(9, dtype=np.uint16).reshape(1, 3, 3)
    assert halve_mode(odd).shape == (1, 2, 2)
    values = np.random.default_rng(1).integers(0, 7, (1, 33, 47), dtype=np.uint8)
    halved = halve_mode(values)
    for y in range(halved.shape[1]):
        for x in range(halved.shape[2]):
            window = values[0, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].ravel()
            counts = np.bincount(window)
            assert counts[halved[0, y, x]] == counts.max()


def test_mask_round_trips_exactly_with_mode_levels_and_ngff_metadata(tmp_path: Path) -> None:
    mask = _pair(tmp_path, "scan", 301, 203)
    [result] = tile(
        [SourceSpec((str(tmp_path / "src" / "scan.tif"),))],
        tmp_path / "ds.zarr",
        SMALL,
        masks=MaskSet(tmp_path / "masks"),
    )
    assert result.status == "written", result.error
    ds = Dataset(tmp_path / "ds.zarr")
    entry = ds.entry("scan")
    assert entry.complete
    values, counts = np.unique(mask, return_counts=True)
    assert entry.mask is not None
    assert entry.mask["values"] == values.tolist()
    assert entry.mask["pixels"] == counts.tolist()
    expected = mask[None]
    for level, shape in enumerate(level_shapes(301, 203, 64)):
        stored = ds.mask("scan", level)
        assert stored.shape == (1, *shape)
        np.testing.assert_array_equal(stored[...], expected, err_msg=f"level {level}")
        expected = halve_mode(expected)
    group = zarr.open_group(tmp_path / "ds.zarr" / "images" / "scan" / "labels", mode="r")
    assert group.attrs["ome"]["labels"] == ["mask"]
    label = group["mask"].attrs["ome"]
    assert [c["label-value"] for c in label["image-label"]["colors"]] == values.tolist()
    assert len(label["multiscales"][0]["datasets"]) == len(level_shapes(301, 203, 64))
    assert not [k for k in group["mask"] if k.startswith("_progress")]

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(tmp_path / "ds.zarr" / "images" / "scan")))())
    labels = [n for n in nodes if "image-label" in n.metadata or n.zarr.path.endswith("mask")]
    assert labels, "ome-zarr finds the label image"


def test_mask_classes_csv_names_the_values(tmp_path: Path) -> None:
    _pair(tmp_path, "a", 64, 64)
    classes = tmp_path / "classes.csv"
    with open(classes, "w", newline="") as fh:
        csv.writer(fh).writerows([["value", "name"], [0, "background"], [1, "road"], [5, "lake"]])
    tile(
        [SourceSpec((str(tmp_path / "src" / "a.tif"),))],
        tmp_path / "ds.zarr",
        SMALL,
        masks=MaskSet(tmp_path / "masks", classes),
    )
    names = Dataset(tmp_path / "ds.zarr").mask_classes()
    assert names == {0: "background", 1: "road", 2: "2", 3: "3", 5: "lake"}
    bad = tmp_path / "bad.csv"
    bad.write_text("value,name\nx,road\n")
    with pytest.raises(UsageError, match="neither an integer nor a colour"):
        MaskSet(tmp_path / "masks", bad)


def test_palette_masks_keep_their_indices(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "src" / "p.tif", coord_pixels(40, 40), photometric="rgb")
    indices = np.zeros((40, 40), dtype=np.uint8)
    indices[10:20, 5:30] = 2
    indices[30:, :] = 1
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "masks" / "p.png")
    tile(
        [SourceSpec((str(tmp_path / "src" / "p.tif"),))],
        tmp_path / "ds.zarr",
        SMALL,
        masks=MaskSet(tmp_path / "masks"),
    )
    np.testing.assert_array_equal(Dataset(tmp_path / "ds.zarr").mask("p")[0], indices)


def test_mask_follows_resampling_by_nearest_label(tmp_path: Path) -> None:
    mask = _pair(tmp_path, "r", 128, 96)
    options = TileOptions(chunk=32, block_size=64, thumbnail_size=32, source_mpp=0.5, mpp=1.0)
    [result] = tile(
        [SourceSpec((str(tmp_path / "src" / "r.tif"),))],
        tmp_path / "ds.zarr",
        options,
        masks=MaskSet(tmp_path / "masks"),
    )
    assert result.status == "written", result.error
    ds = Dataset(tmp_path / "ds.zarr")
    assert ds.level("r").shape == (3, 64, 48)
    # each output pixel takes the source label under its centre: source pixel 2i+1
    np.testing.assert_array_equal(ds.mask("r")[0], mask[1::2, 1::2])


def test_bad_masks_fail_their_image_alone(tmp_path: Path) -> None:
    _pair(tmp_path, "good", 64, 64)
    _pair(tmp_path, "small", 64, 64)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(tmp_path / "masks" / "small_mask.png")
    _pair(tmp_path, "colour", 64, 64)
    (tmp_path / "masks" / "colour_mask.png").unlink()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "masks" / "colour.png")
    tifffile.imwrite(tmp_path / "src" / "orphan.tif", coord_pixels(64, 64), photometric="rgb")
    specs = [
        SourceSpec((str(tmp_path / "src" / f"{n}.tif"),))
        for n in ("good", "small", "colour", "orphan")
    ]
    results = {
        r.id or r.source: r
        for r in tile(specs, tmp_path / "ds.zarr", SMALL, masks=MaskSet(tmp_path / "masks"))
    }
    assert results["good"].status == "written"
    errors = {Path(r.source).stem: r.error for r in results.values() if r.status == "failed"}
    assert set(errors) == {"small", "colour", "orphan"}
    assert "small_mask.png is 32×64 pixels but the image is 64×64" in (errors["small"] or "")
    assert "one channel of integer labels" in (errors["colour"] or "")
    assert "no mask for this image" in (errors["orphan"] or "")
    assert Dataset(tmp_path / "ds.zarr").image_ids() == ["good"]


def test_a_table_names_masks_whose_names_do_not_match_and_a_roi_is_tiled_beside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DRIVE's layout: ``21_training.tif`` ↔ ``21_manual1.gif`` (vessels 0/255) and a field-of-view
    GIF; a source,mask table and a source,roi table put both beside the image."""
    (tmp_path / "images").mkdir()
    (tmp_path / "manual").mkdir()
    tifffile.imwrite(
        tmp_path / "images" / "21_training.tif", coord_pixels(70, 50), photometric="rgb"
    )
    vessels = (np.random.default_rng(0).random((70, 50)) < 0.1).astype(np.uint8) * 255
    fov = np.zeros((70, 50), np.uint8)
    fov[10:60, 5:45] = 255
    # grey GIFs, as DRIVE ships them (Pillow reads them as mode L, values 0 and 255)
    Image.fromarray(vessels).save(tmp_path / "manual" / "21_manual1.gif", optimize=False)
    Image.fromarray(fov).save(tmp_path / "manual" / "21_training_mask.gif", optimize=False)
    (tmp_path / "masks.csv").write_text("source,mask\n21_training.tif,manual/21_manual1.gif\n")
    (tmp_path / "roi.csv").write_text("source,roi\n21_training.tif,manual/21_training_mask.gif\n")
    [result] = tile(
        [SourceSpec((str(tmp_path / "images" / "21_training.tif"),))],
        tmp_path / "ds.zarr",
        SMALL,
        masks=MaskSet(tmp_path / "masks.csv"),
        rois=MaskSet(tmp_path / "roi.csv", option="--roi"),
    )
    assert result.status == "written", result.error
    ds = Dataset(tmp_path / "ds.zarr")
    np.testing.assert_array_equal(ds.mask("21_training")[0], vessels)
    roi = ds.roi("21_training")
    assert roi is not None
    np.testing.assert_array_equal(roi[0], fov)
    assert ds.entry("21_training").roi["values"] == [0, 255]
    image = tmp_path / "ds.zarr" / "images" / "21_training"
    assert zarr.open_group(image / "labels").attrs["ome"]["labels"] == ["mask", "roi"]
    assert_valid_ngff(tmp_path / "ds.zarr", expect={"Image", "ImageLabel", "Labels"})
    assert_labels_have_parents(image, caplog, count=2)
    assert not ds.check("21_training")  # every label level is recorded and checked too
    # training and evaluation read the pixels outside the region as ignored (-1)
    from hiresctl.data import PatchReader

    reader = PatchReader(ds, mask_values=[0, 255])
    truth = np.where(fov == 0, -1, vessels.astype(np.int64) // 255)
    read = reader.read_mask_region("21_training", 0, 0, 50, 70)
    np.testing.assert_array_equal(read, truth)
    edge = reader.read_mask_region("21_training", -8, 40, 16, 16)  # past two edges
    assert (edge[:8] == -1).all() and (edge[:, 10:] == -1).all()
    whole = reader.read_mask_global("21_training", 35).numpy()  # from level 1 (35×25)
    level1 = np.asarray(ds.mask("21_training", 1)[0]).astype(np.int64) // 255
    coarse = np.where(np.asarray(ds.roi("21_training", 1)[0]) == 0, -1, level1)
    np.testing.assert_array_equal(whole[:, :25], coarse)
    assert (whole[:, 25:] == -1).all()


def test_a_mask_table_names_its_problems(tmp_path: Path) -> None:
    _pair(tmp_path, "scan", 40, 30)
    (tmp_path / "bad.csv").write_text("source,file\nscan.tif,masks/scan_mask.png\n")
    with pytest.raises(UsageError, match="needs columns 'source' and 'mask'"):
        MaskSet(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("source,mask\nscan.tif,masks/nowhere.png\n")
    with pytest.raises(UsageError, match=r"gone.csv:2: mask file masks/nowhere.png not found"):
        MaskSet(tmp_path / "gone.csv")
    (tmp_path / "other.csv").write_text("source,mask\nelse.tif,masks/scan_mask.png\n")
    [result] = tile(
        [SourceSpec((str(tmp_path / "src" / "scan.tif"),))],
        tmp_path / "ds.zarr",
        SMALL,
        masks=MaskSet(tmp_path / "other.csv"),
    )
    assert result.status == "failed" and "no mask for this image in" in (result.error or "")


def test_a_value_named_ignore_is_no_class_and_is_read_as_ignored(tmp_path: Path) -> None:
    from hiresctl.data import PatchReader

    mask = _pair(tmp_path, "scan", 40, 30)  # values 0..3
    (tmp_path / "classes.csv").write_text("value,name\n0,background\n1,a\n2,b\n3,ignore\n")
    tile(
        [SourceSpec((str(tmp_path / "src" / "scan.tif"),))],
        tmp_path / "ds.zarr",
        SMALL,
        masks=MaskSet(tmp_path / "masks", tmp_path / "classes.csv"),
    )
    ds = Dataset(tmp_path / "ds.zarr")
    classes = ds.mask_classes()
    assert classes == {0: "background", 1: "a", 2: "b"}
    reader = PatchReader(ds, mask_values=list(classes))
    read = reader.read_mask_region("scan", 0, 0, 30, 40)
    np.testing.assert_array_equal(read, np.where(mask == 3, -1, mask.astype(np.int64)))


def _colour_pair(folder: Path, name: str, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """An image and an RGB mask painted in ``colours`` (random per pixel); the colour indices."""
    (folder / "src").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    tifffile.imwrite(folder / "src" / f"{name}.tif", coord_pixels(60, 44), photometric="rgb")
    index = np.random.default_rng(3).integers(0, len(colours), (60, 44))
    rgb = np.array(colours, np.uint8)[index]
    Image.fromarray(rgb).save(folder / "masks" / f"{name}.png")
    return index


def test_colour_coded_masks_become_class_values_with_their_palette(tmp_path: Path) -> None:
    """Aerial datasets colour their masks: each row's colour is stored as the row's rank, the
    NGFF label keeps the colours, and a colour named 'ignore' is no class."""
    colours = [(60, 16, 152), (132, 41, 246), (254, 221, 58), (0, 0, 0)]
    index = _colour_pair(tmp_path, "scene", colours)
    (tmp_path / "classes.csv").write_text(
        "value,name\n#3C1098,building\n#8429F6,road\n#FEDD3A,water\n#000,ignore\n"
    )
    [result] = tile(
        [SourceSpec((str(tmp_path / "src" / "scene.tif"),))],
        tmp_path / "ds.zarr",
        SMALL,
        masks=MaskSet(tmp_path / "masks", tmp_path / "classes.csv"),
    )
    assert result.status == "written", result.error
    ds = Dataset(tmp_path / "ds.zarr")
    stored = np.asarray(ds.mask("scene")[0])
    np.testing.assert_array_equal(stored, np.array([0, 1, 2, 255], np.uint8)[index])
    assert ds.mask_classes() == {0: "building", 1: "road", 2: "water"}
    label = zarr.open_group(tmp_path / "ds.zarr" / "images" / "scene" / "labels" / "mask")
    palette = {c["label-value"]: c["rgba"] for c in label.attrs["ome"]["image-label"]["colors"]}
    assert palette[0] == [60, 16, 152, 255] and palette[2] == [254, 221, 58, 255]
    assert_valid_ngff(tmp_path / "ds.zarr", expect={"ImageLabel"})


def test_a_colour_no_row_names_fails_its_image_naming_colour_and_pixels(tmp_path: Path) -> None:
    colours = [(60, 16, 152), (255, 0, 255)]
    index = _colour_pair(tmp_path, "scene", colours)
    (tmp_path / "classes.csv").write_text("value,name\n#3C1098,building\n")
    options = SMALL
    [result] = tile(
        [SourceSpec((str(tmp_path / "src" / "scene.tif"),))],
        tmp_path / "ds.zarr",
        options,
        masks=MaskSet(tmp_path / "masks", tmp_path / "classes.csv"),
    )
    assert result.status == "failed"
    assert f"#FF00FF ({int((index == 1).sum())} pixels)" in (result.error or "")
    assert "'*,ignore'" in (result.error or "")
    # with '*,ignore' the unnamed colour is left out instead
    (tmp_path / "classes.csv").write_text("value,name\n#3C1098,building\n*,ignore\n")
    [result] = tile(
        [SourceSpec((str(tmp_path / "src" / "scene.tif"),))],
        tmp_path / "ds.zarr",
        options,
        masks=MaskSet(tmp_path / "masks", tmp_path / "classes.csv"),
    )
    assert result.status == "written", result.error
    stored = np.asarray(Dataset(tmp_path / "ds.zarr").mask("scene")[0])
    np.testing.assert_array_equal(stored, np.where(index == 1, 255, 0))


@pytest.mark.parametrize(
    "rows, problem",
    [
        ("3,road\n#3C1098,building\n", "both integer values and colours"),
        ("#3C1098,a\n#3c1098,b\n", "colour #3c1098 is repeated"),
        ("*,road\n", "can only be 'ignore'"),
        ("blue,road\n", "neither an integer nor a colour"),
    ],
)
def test_a_bad_colour_table_is_named(tmp_path: Path, rows: str, problem: str) -> None:
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.csv").write_text("value,name\n" + rows)
    with pytest.raises(UsageError, match=problem):
        MaskSet(tmp_path / "masks", tmp_path / "classes.csv")

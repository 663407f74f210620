"""Zeiss CZI: a file written here with pylibCZIrw (ZEISS's library) tiles exactly as that
library decodes it, each scene an image of its own, µm/px from the metadata; a damaged file
fails alone in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storage.store import Dataset
from tests.conftest import coord_pixels
from tests.ngff import assert_valid_ngff

pyczi = pytest.importorskip("pylibCZIrw.czi")

PLANE = {"C": 0, "Z": 0, "T": 0}


def write_czi(path: Path, scenes: dict[int, tuple[np.ndarray, tuple[int, int]]]) -> Path:
    """A brightfield CZI (Bgr24) of 0.25 µm pixels: each scene's (h, w, 3) BGR pixels at its
    (x, y) on the plane, written as 96-pixel subblocks, as a scanner writes a mosaic."""
    with pyczi.create_czi(str(path), exist_ok=True) as writer:
        for scene, (pixels, (x0, y0)) in scenes.items():
            for y in range(0, pixels.shape[0], 96):
                for x in range(0, pixels.shape[1], 96):
                    block = np.ascontiguousarray(pixels[y : y + 96, x : x + 96])
                    writer.write(block, plane=PLANE, scene=scene, location=(x0 + x, y0 + y))
        writer.write_metadata(scale_x=0.25e-6, scale_y=0.25e-6)
    return path


def _theirs(path: Path, scene: int) -> np.ndarray:
    """The scene as pylibCZIrw decodes it, turned from its B, G, R into R, G, B."""
    with pyczi.open_czi(str(path)) as reader:
        rect = reader.scenes_bounding_rectangle[scene]
        bgr = reader.read(roi=(rect.x, rect.y, rect.w, rect.h), plane=PLANE, scene=scene)
    return bgr[..., ::-1].transpose(2, 0, 1)


def _level0(store: Path, image_id: str) -> np.ndarray:
    return np.asarray(Dataset(store).level(image_id, 0)[...])


def test_each_scene_tiles_exactly_as_pylibczirw_decodes_it(cli: Callable, tmp_path: Path) -> None:
    first = coord_pixels(250, 300)
    second = coord_pixels(130, 170)[::-1].copy()
    path = write_czi(tmp_path / "scan.czi", {0: (first, (0, 0)), 1: (second, (900, 400))})
    store = tmp_path / "ds.zarr"
    result = cli("tile", path, "--out", store, "--json", "--chunk", "64")
    assert result.code == 0, result.stderr
    rows = {row["id"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"scan_s0", "scan_s1"}
    assert rows["scan_s0"]["shape"] == [3, 250, 300] and rows["scan_s1"]["shape"] == [3, 130, 170]
    for image_id, scene, written in (("scan_s0", 0, first), ("scan_s1", 1, second)):
        ours = _level0(store, image_id)
        np.testing.assert_array_equal(ours, _theirs(path, scene))
        np.testing.assert_array_equal(ours, written[..., ::-1].transpose(2, 0, 1))  # lossless
        assert Dataset(store).entry(image_id).mpp == pytest.approx(0.25)
    assert set(assert_valid_ngff(store).values()) == {"Image"}
    again = cli("tile", path, "--out", store, "--json", "--chunk", "64")
    assert {json.loads(line)["status"] for line in again.stdout.splitlines()} == {"skipped"}


def test_a_single_scene_file_is_one_image_named_after_it(cli: Callable, tmp_path: Path) -> None:
    pixels = coord_pixels(100, 120)
    path = write_czi(tmp_path / "one.czi", {0: (pixels, (0, 0))})
    store = tmp_path / "ds.zarr"
    assert cli("tile", path, "--out", store).code == 0
    assert Dataset(store).image_ids() == ["one"]
    np.testing.assert_array_equal(_level0(store, "one"), _theirs(path, 0))


def test_a_truncated_czi_fails_alone_in_one_line(cli: Callable, tmp_path: Path) -> None:
    good = write_czi(tmp_path / "good.czi", {0: (coord_pixels(64, 64), (0, 0))})
    whole = write_czi(tmp_path / "whole.czi", {0: (coord_pixels(200, 200), (0, 0))}).read_bytes()
    bad = tmp_path / "bad.czi"
    bad.write_bytes(whole[: len(whole) // 3])
    result = cli("tile", bad, good, "--out", tmp_path / "ds.zarr")
    assert result.code == 1
    errors = [line for line in result.stderr.splitlines() if "bad.czi" in line]
    assert errors and "Traceback" not in result.stderr
    assert Dataset(tmp_path / "ds.zarr").image_ids() == ["good"]

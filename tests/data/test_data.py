"""Patch grid, reader, foreground filter: exact pixels, row-major positions, reads bounded by need."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from zarr.storage import LocalStore, WrapperStore

from hiresctl.data import (
    NO_FLIP,
    Flip,
    PatchAugment,
    PatchGrid,
    PatchReader,
    flip_boxes,
    foreground_fraction,
    to_unit_rgb,
)
from storage import Dataset
from tests.conftest import coord_pixels
from tests.stores import make_store


def test_grid_is_row_major_and_padded() -> None:
    grid = PatchGrid.of(100, 70, 32)
    assert (grid.rows, grid.cols) == (4, 3)  # 100 → 4 patches (padded), 70 → 3
    rows, cols = grid.position(np.arange(grid.num_patches))
    assert list(rows[:4]) == [0, 0, 0, 1] and list(cols[:4]) == [0, 1, 2, 0]
    assert grid.origin(5) == (32, 64)
    overlap = PatchGrid.of(64, 64, 32, stride=16)
    assert (overlap.rows, overlap.cols) == (3, 3)


def test_reader_returns_exact_patches_padded_with_fill(tmp_path: Path) -> None:
    pixels = coord_pixels(100, 70)
    store = make_store(tmp_path, {"a": pixels})
    reader = PatchReader(store)
    grid = reader.grid("a", 32)
    got = reader.read_patches_unit("a", grid, [5, 11])  # (1, 2) and (3, 2)
    expect = np.zeros((2, 32, 32, 3), np.uint8)
    expect[0] = pixels[32:64, 64:96] if pixels[32:64, 64:96].shape[1] == 32 else 0
    expect[0, :, :6] = pixels[32:64, 64:70]
    expect[1, :4, :6] = pixels[96:100, 64:70]
    assert torch.equal(got, to_unit_rgb(expect.transpose(0, 3, 1, 2)))
    assert reader.patches_read == 2


_READ_KEYS: list[str] = []


class _CountingStore(WrapperStore[LocalStore]):
    """Records the keys zarr reads (zarr may copy the store object, so the list is global)."""

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def, override]
        _READ_KEYS.append(key)
        return await self._store.get(key, prototype, byte_range)


def test_global_patch_comes_from_the_pyramid_not_level_0(tmp_path: Path) -> None:
    pixels = coord_pixels(512, 384)
    store = make_store(tmp_path, {"a": pixels}, chunk=64, thumbnail_size=64)
    counting = _CountingStore(LocalStore(str(store)))
    _READ_KEYS.clear()
    reader = PatchReader(Dataset(counting))  # type: ignore[arg-type]
    image = reader.read_global_unit("a", 32)
    assert image.shape == (3, 32, 32)
    level0 = [k for k in _READ_KEYS if k.startswith("images/a/0/c")]
    assert level0 == []
    assert any(k.startswith(("images/a/thumbnail/c", "images/a/3/c")) for k in _READ_KEYS)
    # letterboxed right: the last columns are fill (0), the image occupies 384/512 of the width
    assert float(image[:, :, -3:].abs().sum()) == 0.0


@pytest.mark.parametrize("channels", [1, 3])
def test_global_patch_equals_the_resize_of_zarrs_own_read(tmp_path: Path, channels: int) -> None:
    """The global patch read by whole chunks, resized before grey becomes RGB, is zarr's own
    read of the chosen level, letterboxed, made RGB and resized."""
    import torch.nn.functional as F

    from hiresctl.data.reader import to_unit_rgb

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 200, channels), dtype=np.uint8)
    if channels == 1:
        pixels = pixels[..., 0]
    store = make_store(tmp_path, {"a": pixels}, chunk=64, thumbnail_size=64)
    reader = PatchReader(store)
    for size in (32, 100):
        got = reader.read_global_unit("a", size)
        group = Dataset(store).image_group("a")
        arrays = [group[k] for k in group.array_keys() if k == "thumbnail" or k.isdigit()]
        chosen = min((a for a in arrays if max(a.shape[1:]) >= size), key=lambda a: a.size)
        level = np.asarray(chosen[...])
        side = max(level.shape[1:])
        square = np.zeros((level.shape[0], side, side), level.dtype)
        square[:, : level.shape[1], : level.shape[2]] = level
        expected = F.interpolate(
            to_unit_rgb(square).unsqueeze(0),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0].clamp(0.0, 1.0)
        assert got.shape == (3, size, size)
        assert torch.allclose(got, expected, atol=1e-6)
        assert torch.equal(reader.read_global_unit("a", size), got)  # the second read alike


def test_foreground_fraction_maps_mask_to_patches() -> None:
    grid = PatchGrid.of(128, 128, 32)  # 4×4 patches
    mask = np.zeros((1, 16, 16), np.uint8)  # thumbnail-resolution mask, 8 px per... 4 px per patch
    mask[0, :4, :4] = 1  # exactly patch (0, 0)
    mask[0, 8:10, 12:16] = 1  # half of patch (2, 3)
    fraction = foreground_fraction(mask, grid)
    assert fraction[0] == 1.0 and fraction[grid.index(2, 3)] == 0.5
    assert fraction.sum() == pytest.approx(1.5)


def test_augmentation_is_identical_for_every_patch_of_an_image() -> None:
    augment = PatchAugment("color", seed=1)
    patches = torch.full((2, 3, 8, 8), 0.5)
    out_a = augment(patches, "image-a")
    glob = augment(torch.full((3, 8, 8), 0.5), "image-a")
    assert torch.allclose(out_a[0], out_a[1]) and torch.allclose(out_a[0], glob)
    augment.epoch = 1
    assert not torch.allclose(augment(patches, "image-a"), out_a)


@pytest.mark.parametrize("ahead_bytes", [1, 2**30])
def test_stream_yields_every_request_in_plan_order(tmp_path: Path, ahead_bytes: int) -> None:
    from hiresctl.data import PatchStream, ReadRequest

    store = make_store(tmp_path, {"a": coord_pixels(128, 96)})
    reader = PatchReader(store)
    grid = reader.grid("a", 32)
    plan = [
        ReadRequest("a", "patches", grid, np.array([i, (i + 5) % 12]), tag=i) for i in range(12)
    ]
    plan.append(ReadRequest("a", "global", grid, tag=12))
    got = list(PatchStream(reader, ahead_bytes=ahead_bytes)(plan))
    assert [request.tag for request, _ in got] == list(range(13))
    for request, pixels in got[:-1]:
        assert torch.equal(pixels, reader.read_patches("a", grid, request.indices))


def test_read_ahead_thread_computes_on_one_thread(tmp_path: Path) -> None:
    """The read-ahead thread's tensor work runs on one OpenMP thread (as DataLoader workers'
    does), while the thread that trains keeps its count, and so do threads started later."""
    from hiresctl.data import PatchStream, ReadRequest
    from hiresctl.data.stream import _omp_set_num_threads

    if _omp_set_num_threads() is None:
        pytest.skip("torch's OpenMP runtime is not found in this process (not Linux?)")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        class Recording:
            def flip(self, image_id: str) -> Flip:
                return Flip(vertical=False, horizontal=False)

            def __call__(self, pixels: torch.Tensor, image_id: str) -> torch.Tensor:
                seen.append(torch.get_num_threads())
                return pixels

        store = make_store(tmp_path, {"a": coord_pixels(64, 64)})
        reader = PatchReader(store)
        grid = reader.grid("a", 32)
        plan = [ReadRequest("a", "patches", grid, np.array([i]), tag=i) for i in range(4)]
        got = list(PatchStream(reader, augment=Recording())(plan))
        assert len(got) == 4 and seen == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
    finally:
        torch.set_num_threads(threads)


FLIPS = [Flip(vertical=v, horizontal=h) for v in (False, True) for h in (False, True)]


def _mirrored(array: np.ndarray, flip: Flip) -> np.ndarray:
    """(h, w, …) array as ``flip`` mirrors its image."""
    if flip.vertical:
        array = array[::-1]
    if flip.horizontal:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def test_flipped_reads_equal_reads_of_the_mirrored_image(tmp_path: Path) -> None:
    # Sides that are not multiples of the patch (100 × 70, patch 32), so the mirrored grid
    # does not line up with the stored one: every read of "a" through a flip must equal the
    # same read of the image stored mirrored: patches, global patch, mask patches, mask global.
    pixels = coord_pixels(100, 70)
    mask = ((np.arange(100)[:, None] // 9 + np.arange(70)[None, :] // 13) % 3).astype(np.uint8)
    images = {"a": pixels} | {f"m{i}": _mirrored(pixels, f) for i, f in enumerate(FLIPS)}
    masks = {"a": mask} | {f"m{i}": _mirrored(mask, f) for i, f in enumerate(FLIPS)}
    store = make_store(tmp_path, images, masks=masks)
    reader = PatchReader(store, mask_values=[0, 1, 2])
    grid = reader.grid("a", 32)
    everything = np.arange(grid.num_patches)
    for i, flip in enumerate(FLIPS):
        mirror = f"m{i}"
        assert torch.equal(
            reader.read_patches_unit("a", grid, everything, flip),
            reader.read_patches_unit(mirror, grid, everything),
        )
        assert torch.equal(
            reader.read_mask_patches("a", grid, everything, flip),
            reader.read_mask_patches(mirror, grid, everything),
        )
        # 100: the global patch comes from level 0, so it is exact too
        assert torch.equal(
            reader.read_global_unit("a", 100, flip), reader.read_global_unit(mirror, 100)
        )
        assert torch.equal(
            reader.read_mask_global("a", 100, flip), reader.read_mask_global(mirror, 100)
        )
    # and a flip does change what is read
    assert not torch.equal(
        reader.read_patches_unit("a", grid, [0], FLIPS[1]), reader.read_patches_unit("a", grid, [0])
    )


def test_flipped_boxes_cover_the_same_pixels_in_the_mirrored_image() -> None:
    image = np.zeros((60, 90), np.uint8)
    boxes = np.array([[5, 10, 25, 20], [60, 0, 90, 60], [0, 50, 1, 60]], np.float32)
    for x0, y0, x1, y1 in boxes.astype(int):
        image[y0:y1, x0:x1] += 1
    for flip in FLIPS:
        moved = flip_boxes(boxes, flip, 60, 90)
        mirrored = _mirrored(image, flip)
        for (x0, y0, x1, y1), before in zip(
            moved.round().astype(int), boxes.astype(int), strict=True
        ):
            assert (x1 - x0, y1 - y0) == (before[2] - before[0], before[3] - before[1])
            assert mirrored[y0:y1, x0:x1].min() == 1  # the box still covers its object
        np.testing.assert_allclose(flip_boxes(moved, flip, 60, 90), boxes, atol=1e-4)
    assert flip_boxes(boxes, NO_FLIP, 60, 90) is boxes


def test_flips_are_drawn_per_image_and_epoch_and_cover_all_four() -> None:
    augment = PatchAugment("none", seed=3, geometric="flip")
    seen = set()
    for epoch in range(40):
        augment.epoch = epoch
        first = augment.flip("image-a")
        assert augment.flip("image-a") == first  # every read of an image in an epoch agrees
        seen.add(first)
    assert seen == set(FLIPS)
    assert PatchAugment("none", seed=3).flip("image-a") == NO_FLIP

"""`hiresctl embed`: features equal to the encoder's on the patches training reads, resumable
per image, TRIDENT/CLAM h5 export, level chosen by µm/px."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr

from hiresctl.data import PatchReader, kept_patches
from hiresctl.features import EmbedOptions, embed_store
from hiresctl.models import create_backbone
from storage import Dataset
from storage.tiler import SourceSpec, TileOptions, tile
from tests.conftest import coord_pixels, torchrun
from tests.ngff import assert_valid_ngff
from tests.stores import make_store, planted_images

CPU = torch.device("cpu")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    images, labels = planted_images(4, 96, 32, seed=2)
    for pixels in images.values():  # tissue in the middle, a white background around it
        tissue = pixels[16:80, 16:80].copy()
        pixels[...] = 240
        pixels[16:80, 16:80] = tissue // 2 + (90, 40, 110)
    return make_store(tmp_path / "data", images, labels)


def test_features_are_the_encoders_on_the_kept_patches(store: Path) -> None:
    options = EmbedOptions(
        backbone="tiny", patch_size=32, foreground_threshold=0.5, dtype="float32", batch_size=5
    )
    results = embed_store(store, options, CPU)
    assert [r.status for r in results] == ["written"] * 4
    dataset = Dataset(store)
    torch.manual_seed(0)  # random weights come from the seed: the same network
    encoder = create_backbone("tiny").eval()
    reader = PatchReader(dataset)
    for entry in dataset.entries():
        features, coords, attrs = dataset.feature_set(entry.id, "tiny")
        grid = reader.grid(entry.id, 32)
        kept = kept_patches(dataset, entry.id, grid, 0.5)
        assert 0 < len(kept) < grid.num_patches  # background patches are left out
        with torch.no_grad():
            expected = encoder.forward_features(reader.read_patches(entry.id, grid, kept))
        np.testing.assert_allclose(features[...], expected.numpy(), rtol=1e-5, atol=1e-5)
        rows, cols = grid.position(kept)
        np.testing.assert_array_equal(coords[...], np.stack([cols * 32, rows * 32], 1))
        assert attrs["patch_size_level0"] == 32 and attrs["level"] == 0
        assert attrs["settings"]["weights"] == "random:tiny:seed0"
    assert set(assert_valid_ngff(store).values()) == {"Image"}  # the images stay valid NGFF


def test_a_killed_run_redoes_only_the_unfinished_image(store: Path) -> None:
    options = EmbedOptions(backbone="tiny", patch_size=32)
    embed_store(store, options, CPU)
    dataset = Dataset(store)
    first = dataset.entries()[0].id
    group = zarr.open_group(store / "images" / first / "features" / "tiny", mode="r+")
    group.attrs["hiresctl"] = {**group.attrs["hiresctl"], "status": "incomplete"}  # killed here
    assert first not in [e.id for e in dataset.entries() if dataset.feature_sets(e.id)]
    again = {r.image_id: r.status for r in embed_store(store, options, CPU)}
    assert again == {e.id: ("written" if e.id == first else "skipped") for e in dataset.entries()}
    # other settings under the same name: refused per image, unless replaced on purpose
    other = EmbedOptions(backbone="tiny", patch_size=48)
    refused = embed_store(store, other, CPU)
    assert all(r.status == "failed" and "--overwrite" in (r.error or "") for r in refused)
    assert all(r.status == "written" for r in embed_store(store, other, CPU, overwrite=True))
    assert Dataset(store).feature_set(first, "tiny")[2]["patch_size"] == 48


def test_cli_overwrite_replaces_a_set_embedded_with_other_settings(
    store: Path, cli: Callable
) -> None:
    first = cli("embed", store, "--backbone", "tiny", "--patch-size", "32", "--name", "set")
    assert first.code == 0, first.stderr
    refused = cli("embed", store, "--backbone", "tiny", "--patch-size", "48", "--name", "set")
    assert refused.code == 1 and "--overwrite" in refused.stderr
    replaced = cli(
        "embed", store, "--backbone", "tiny", "--patch-size", "48", "--name", "set", "--overwrite"
    )
    assert replaced.code == 0, replaced.stderr
    for entry in Dataset(store).entries():
        assert Dataset(store).feature_set(entry.id, "set")[2]["patch_size"] == 48


def test_h5_export_is_what_trident_and_clam_read(
    store: Path, tmp_path: Path, cli: Callable
) -> None:
    import h5py

    result = cli(
        "embed", store, "--backbone", "tiny", "--patch-size", "32", "--export-h5", tmp_path / "h5"
    )
    assert result.code == 0, result.stderr
    assert "4 embedded" in result.stderr and "images/s" in result.stderr
    dataset = Dataset(store)
    for entry in dataset.entries():
        features, coords, _ = dataset.feature_set(entry.id, "tiny")
        with h5py.File(tmp_path / "h5" / f"{entry.id}.h5", "r") as handle:
            assert handle["features"].dtype == np.float32
            np.testing.assert_array_equal(handle["features"][...], features[...].astype(np.float32))
            np.testing.assert_array_equal(handle["coords"][...], coords[...])
            assert dict(handle["coords"].attrs) == {
                "patch_size": 32,
                "patch_level": 0,
                "patch_size_level0": 32,
            }


def _slide(folder: Path) -> Path:
    """A 256² tiled TIFF of 0.25 µm pixels whose values say where they are."""
    source = folder / "slide.tif"
    tifffile.imwrite(
        source,
        coord_pixels(256, 256),
        photometric="rgb",
        tile=(64, 64),
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    return source


def test_mpp_chooses_the_level_and_coords_stay_level_0(tmp_path: Path) -> None:
    source = _slide(tmp_path)
    out = tmp_path / "ds.zarr"
    [tiled] = tile([SourceSpec((str(source),))], out, TileOptions(chunk=32, thumbnail_size=32))
    assert Dataset(out).entry(tiled.id).mpp == pytest.approx(0.25)
    [done] = embed_store(out, EmbedOptions(backbone="tiny", patch_size=32, mpp=0.5), CPU)
    assert done.status == "written" and done.patches == 16  # level 1: 128² in 32² patches
    _, coords, attrs = Dataset(out).feature_set(tiled.id, "tiny")
    assert attrs["level"] == 1 and attrs["patch_size_level0"] == 64
    assert attrs["mpp"] == pytest.approx(0.5)
    assert coords[...].max() == 192  # the last patch's corner, in level-0 pixels


def _stamp_coords(handle: Any) -> tuple[np.ndarray, float, float]:
    """Coordinates as STAMP's loader reads them (stamp.modeling.data.get_coords, its "newer
    STAMP format" branch): micrometres, the tile side from ``tile_size_um`` and the pixel size
    as ``tile_size_um / tile_size_px``."""
    coords_um = handle["coords"][:]
    tile_size_um = float(handle.attrs["tile_size_um"])
    return coords_um, tile_size_um, tile_size_um / int(handle.attrs["tile_size_px"])


def test_stamp_export_is_what_stamp_reads(tmp_path: Path, cli: Callable) -> None:
    """Features of a slide with a pixel size in STAMP's layout: ``feats`` as stored, coords
    in µm on the tile grid, the pixel size of the level read; a store image without a pixel
    size is one failure line and the others are written."""
    import h5py

    source = _slide(tmp_path)
    plain = tmp_path / "plain.png"
    import PIL.Image

    PIL.Image.fromarray(coord_pixels(64, 64)).save(plain)
    out = tmp_path / "ds.zarr"
    tiled = tile(
        [SourceSpec((str(source),)), SourceSpec((str(plain),))], out, TileOptions(chunk=32)
    )
    ids = {t.id for t in tiled}
    embed = ["embed", out, "--backbone", "tiny", "--patch-size", "32"]
    stamp = ["--export-stamp", tmp_path / "stamp"]
    result = cli(*embed, "--mpp", "0.5", *stamp)
    assert result.code != 0  # the image without a pixel size cannot be embedded at --mpp
    result = cli(*embed, "--level", "0", "--name", "l0", *stamp)
    assert result.code == 1 and "plain: states no pixel size" in result.stderr
    assert "1 STAMP h5 files" in result.stderr
    dataset = Dataset(out)
    [slide] = [i for i in ids if dataset.entry(i).mpp]
    features, coords, _ = dataset.feature_set(slide, "l0")
    with h5py.File(tmp_path / "stamp" / f"{slide}.h5", "r") as handle:
        feats = handle["feats"][:]
        coords_um, tile_um, mpp = _stamp_coords(handle)
        assert handle.attrs["unit"] == "um" and handle.attrs["feat_type"] == "tile"
        assert json.loads(handle.attrs["hiresctl"])["weights"] == "random:tiny:seed0"
    np.testing.assert_array_equal(feats, features[...].astype(np.float16))
    assert mpp == pytest.approx(0.25) and tile_um == pytest.approx(8.0)
    np.testing.assert_allclose(coords_um, coords[...] * 0.25)
    grid = coords_um / tile_um  # whole tiles apart, as STAMP's heatmaps place them
    np.testing.assert_allclose(grid, np.round(grid))
    assert not (tmp_path / "stamp" / f"{next(i for i in ids if i != slide)}.h5").exists()


def test_torchrun_embeds_every_image_once_across_two_ranks(store: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 hiresctl embed``: each image written by one rank (its
    features those of the one encoder), rank 0 reports all of them; run again, all skipped."""
    command = ["-m", "hiresctl", "embed", str(store), "--backbone", "tiny", "--patch-size", "32"]
    command += ["--device", "cpu", "--json"]
    first = torchrun(*command, port=29541)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    dataset = Dataset(store)
    ids = [e.id for e in dataset.entries()]
    assert sorted(r["image_id"] for r in lines) == sorted(ids)  # each once, all reported
    assert {r["status"] for r in lines} == {"written"}
    assert "4 embedded" in first.stderr
    torch.manual_seed(0)
    encoder = create_backbone("tiny").eval()
    reader = PatchReader(dataset)
    for image_id in ids:
        features, _, _ = dataset.feature_set(image_id, "tiny")
        grid = reader.grid(image_id, 32)
        with torch.no_grad():
            expected = encoder.forward_features(
                reader.read_patches(image_id, grid, np.arange(features.shape[0]))
            )
        np.testing.assert_allclose(features[...], expected.numpy(), rtol=1e-3, atol=1e-3)
    again = torchrun(*command, port=29541)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 embedded, 4 already done" in again.stderr

"""`hiresctl embed`: features equal to the encoder's on the patches training reads, resumable
per image, TRIDENT/CLAM h5 export, level chosen by µm/px."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
from tests.conftest import coord_pixels
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


def test_mpp_chooses_the_level_and_coords_stay_level_0(tmp_path: Path) -> None:
    source = tmp_path / "slide.tif"
    tifffile.imwrite(
        source,
        coord_pixels(256, 256),
        photometric="rgb",
        tile=(64, 64),
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    out = tmp_path / "ds.zarr"
    [tiled] = tile([SourceSpec((str(source),))], out, TileOptions(chunk=32, thumbnail_size=32))
    assert Dataset(out).entry(tiled.id).mpp == pytest.approx(0.25)
    [done] = embed_store(out, EmbedOptions(backbone="tiny", patch_size=32, mpp=0.5), CPU)
    assert done.status == "written" and done.patches == 16  # level 1: 128² in 32² patches
    _, coords, attrs = Dataset(out).feature_set(tiled.id, "tiny")
    assert attrs["level"] == 1 and attrs["patch_size_level0"] == 64
    assert attrs["mpp"] == pytest.approx(0.5)
    assert coords[...].max() == 192  # the last patch's corner, in level-0 pixels

"""Every source flavour tiles into valid OME-NGFF, and a store of an older format is read as it
is and upgraded in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from storage.store import Dataset
from storage.tiler import SourceSpec, TileOptions, tile
from tests.conftest import coord_pixels

SMALL = TileOptions(chunk=32, block_size=128, thumbnail_size=64)


def _tiff(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, pixels, tile=(64, 64), compression="zlib", **kwargs)
    return path


def _flavour(tmp_path: Path, flavour: str) -> SourceSpec:
    """A small source of one supported flavour (the readers' tests check their pixels)."""
    from PIL import Image

    pixels = coord_pixels(200, 300)
    path = tmp_path / f"{flavour}.tif"
    if flavour == "tiled-rgb":
        tifffile.imwrite(path, pixels, tile=(64, 64), compression="zlib")
    elif flavour == "tiled-rgba-zstd":
        tifffile.imwrite(path, coord_pixels(200, 300, 4), tile=(64, 64), compression="zstd")
    elif flavour == "striped-gray16":
        tifffile.imwrite(path, coord_pixels(200, 300, 1, "uint16")[..., 0], rowsperstrip=7)
    elif flavour == "bigtiff":
        tifffile.imwrite(path, pixels[..., 0], tile=(64, 64), bigtiff=True)
    elif flavour == "planar":
        tifffile.imwrite(
            path,
            pixels.transpose(2, 0, 1).copy(),
            photometric="rgb",
            planarconfig="separate",
            tile=(64, 64),
        )
    elif flavour == "ome-pyramid-mpp":
        path = tmp_path / "slide.ome.tif"
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(
                pixels,
                tile=(64, 64),
                subifds=1,
                photometric="rgb",
                metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "axes": "YXS"},
            )
            tw.write(pixels[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
    elif flavour == "svs":
        path = tmp_path / "slide.svs"
        desc = "Aperio Image Library v12.0.0\n256x256 [0,0 256x256] (128x128) RAW|MPP = 0.5"
        tifffile.imwrite(
            path,
            coord_pixels(256, 256),
            tile=(128, 128),
            photometric="rgb",
            description=desc,
            metadata=None,
        )
    elif flavour in ("png", "jpeg"):
        path = tmp_path / f"photo.{'png' if flavour == 'png' else 'jpg'}"
        Image.fromarray(pixels).save(path)
    else:  # geotiff-mosaic: two georeferenced tiles side by side
        tags = [
            (33550, "d", 3, (0.5, 0.5, 0.0), False),
            (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 32633), False),
        ]
        paths = []
        for c in range(2):
            tie = (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0 + c * 64.0, 4e6, 0.0), False)
            paths.append(tmp_path / f"tile_{c}.tif")
            tifffile.imwrite(
                paths[-1],
                pixels[:128, c * 128 : (c + 1) * 128].copy(),
                tile=(64, 64),
                extratags=[*tags, tie],
            )
        return SourceSpec(tuple(str(p) for p in paths), mosaic="scene")
    return SourceSpec((str(path),))


FLAVOURS = [
    "tiled-rgb",
    "tiled-rgba-zstd",
    "striped-gray16",
    "bigtiff",
    "planar",
    "ome-pyramid-mpp",
    "svs",
    "png",
    "jpeg",
    "geotiff-mosaic",
]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_source_flavour_tiles_into_valid_ome_ngff(
    tmp_path: Path, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.ngff import assert_labels_have_parents, assert_valid_ngff

    [result] = tile([_flavour(tmp_path, flavour)], tmp_path / "ds.zarr", SMALL)
    assert result.status == "written", result.error
    # the image group, judged by ome-zarr-models; no label image (the foreground mask is not one)
    assert set(assert_valid_ngff(tmp_path / "ds.zarr").values()) == {"Image"}
    assert_labels_have_parents(tmp_path / "ds.zarr" / "images" / result.id, caplog, 0)
    assert Dataset(tmp_path / "ds.zarr").foreground(result.id).shape[0] == 1


def _as_format_1_0(store: Path, image_id: str) -> None:
    """Rewrite a store as version 1.0 laid it out: the foreground mask as the one-level label
    image labels/foreground (which OME-NGFF validators refuse)."""
    root = zarr.open_group(store, mode="r+")
    group = root[f"images/{image_id}"]
    mask = np.asarray(group["foreground"][...])
    del group["foreground"]
    label = group.require_group("labels").create_group("foreground")
    label.create_array("0", shape=mask.shape, dtype="uint8", chunks=mask.shape)[...] = mask
    label.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                **group.attrs["ome"]["multiscales"][0],
                "name": "foreground",
                "datasets": group.attrs["ome"]["multiscales"][0]["datasets"][:1],
            }
        ],
        "image-label": {"version": "0.5", "colors": [{"label-value": 1, "rgba": [255, 0, 0, 128]}]},
    }
    group["labels"].attrs["ome"] = {"version": "0.5", "labels": ["foreground"]}
    root.attrs["hiresctl"] = {**root.attrs["hiresctl"], "format_version": "1.0"}


def test_a_format_1_0_store_is_read_as_it_is_and_upgraded_in_place(tmp_path: Path, cli) -> None:
    from ome_zarr_models.v05 import Image

    pixels = np.full((128, 192, 3), 240, np.uint8)
    pixels[32:96, 64:128] = (150, 60, 120)
    spec = SourceSpec((str(_tiff(tmp_path / "old.tif", pixels)),))
    tile([spec], tmp_path / "ds.zarr", SMALL)
    expected = Dataset(tmp_path / "ds.zarr").foreground("old")
    _as_format_1_0(tmp_path / "ds.zarr", "old")
    with pytest.raises((ValueError, RuntimeError), match="label"):  # what the old layout met
        Image.from_zarr(zarr.open_group(tmp_path / "ds.zarr" / "images" / "old", mode="r"))
    old = Dataset(tmp_path / "ds.zarr")
    np.testing.assert_array_equal(old.foreground("old"), expected)  # read as it is
    described = cli("info", tmp_path / "ds.zarr")
    assert (
        described.code == 0 and "outdated" in described.stderr and "--upgrade" in described.stderr
    )
    upgraded = cli("info", tmp_path / "ds.zarr", "--upgrade")
    assert upgraded.code == 0, upgraded.stderr
    assert "old: foreground mask moved" in upgraded.stderr and "outdated" not in upgraded.stderr
    from tests.ngff import assert_valid_ngff

    assert set(assert_valid_ngff(tmp_path / "ds.zarr").values()) == {"Image"}
    new = Dataset(tmp_path / "ds.zarr")
    assert new.format_version == "1.1" and not new.outdated
    np.testing.assert_array_equal(new.foreground("old"), expected)
    # resuming `tile` into an old store upgrades it too, so one store holds one layout
    _as_format_1_0(tmp_path / "ds.zarr", "old")
    second = SourceSpec((str(_tiff(tmp_path / "new.tif", pixels)),))
    tile([spec, second], tmp_path / "ds.zarr", SMALL)
    assert set(assert_valid_ngff(tmp_path / "ds.zarr").values()) == {"Image"}
    assert Dataset(tmp_path / "ds.zarr").format_version == "1.1"

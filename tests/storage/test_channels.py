"""Multiplexed images keep their channel names: an OME-TIFF's Channel elements and a QPTIFF's
per-page Name/Color become the NGFF ``omero`` channels (label, colour, window) a viewer shows,
and the store stays valid NGFF; RGB images get no channel block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import zarr

from storage.store import Dataset
from storage.tiler import SourceSpec, TileOptions, tile
from tests.ngff import assert_valid_ngff

NAMES = ("DAPI", "CD8", "PanCK")


def _omero(store: Path, image_id: str) -> dict | None:
    group = zarr.open_group(store / "images" / image_id, mode="r")
    return group.attrs["ome"].get("omero")


def _planes(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (3, 96, 128), dtype=np.uint16)


def test_ome_tiff_channel_names_and_colours_reach_the_ngff_omero_block(tmp_path: Path) -> None:
    source = tmp_path / "panel.ome.tif"
    colours = [0x0000FFFF, 0x00FF00FF, -16776961]  # RGBA as signed 32-bit: blue, green, red
    tifffile.imwrite(
        source,
        _planes(),
        ome=True,
        tile=(32, 32),
        metadata={"axes": "CYX", "Channel": {"Name": list(NAMES), "Color": colours}},
    )
    store = tmp_path / "ds.zarr"
    [result] = tile([SourceSpec((str(source),))], store, TileOptions(chunk=32))
    assert result.status == "written", result.error
    channels = _omero(store, "panel")["channels"]
    assert [c["label"] for c in channels] == list(NAMES)
    assert [c["color"] for c in channels] == ["0000FF", "00FF00", "FF0000"]
    assert channels[0]["window"] == {"min": 0.0, "max": 65535.0, "start": 0.0, "end": 65535.0}
    np.testing.assert_array_equal(Dataset(store).level("panel", 0)[...], _planes())
    assert_valid_ngff(store)


def _qpi_description(name: str, colour: str) -> str:
    return (
        '<?xml version="1.0" encoding="utf-16"?>\n<PerkinElmer-QPI-ImageDescription>'
        "<DescriptionVersion>2</DescriptionVersion><ImageType>FullResolution</ImageType>"
        f"<Name>{name}</Name><Color>{colour}</Color><Biomarker>{name}</Biomarker>"
        "</PerkinElmer-QPI-ImageDescription>"
    )


def test_qptiff_page_names_become_channel_labels(tmp_path: Path) -> None:
    source = tmp_path / "scan.qptiff"
    colours = ("0,0,255", "0,255,0", "255,0,0")
    with tifffile.TiffWriter(source) as writer:
        for plane, name, colour in zip(_planes(1), NAMES, colours, strict=True):
            writer.write(
                plane,
                tile=(32, 32),
                software="PerkinElmer-QPI",
                description=_qpi_description(name, colour),
                metadata=None,
            )
    with tifffile.TiffFile(source) as tif:
        assert tif.is_qpi and tif.series[0].shape == (3, 96, 128)  # as tifffile reads QPTIFF
    store = tmp_path / "ds.zarr"
    [result] = tile([SourceSpec((str(source),))], store, TileOptions(chunk=32))
    assert result.status == "written", result.error
    channels = _omero(store, "scan")["channels"]
    assert [(c["label"], c["color"]) for c in channels] == [
        ("DAPI", "0000FF"),
        ("CD8", "00FF00"),
        ("PanCK", "FF0000"),
    ]
    np.testing.assert_array_equal(Dataset(store).level("scan", 0)[...], _planes(1))
    assert_valid_ngff(store)


def test_rgb_images_have_no_channel_block(tmp_path: Path) -> None:
    source = tmp_path / "rgb.tif"
    tifffile.imwrite(source, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    store = tmp_path / "ds.zarr"
    tile([SourceSpec((str(source),))], store, TileOptions(chunk=32))
    assert _omero(store, "rgb") is None

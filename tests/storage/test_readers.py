"""Readers return exact pixels, channel first, for every supported file flavour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from storage.composite import MosaicReader
from storage.errors import SourceError
from storage.readers import ImageFileReader, OpenSlideReader, TiffReader, open_source
from tests.conftest import coord_pixels

REGION = (37, 250, 300, 200)  # y, x, height, width: crosses tile borders


def _expect(pixels: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    return pixels[y : y + h, x : x + w].transpose(2, 0, 1)


@pytest.mark.parametrize(
    ("kwargs", "channels", "dtype"),
    [
        ({"tile": (128, 128), "compression": "zlib"}, 3, "uint8"),
        ({"tile": (128, 128), "compression": "zstd"}, 4, "uint8"),
        ({"rowsperstrip": 7, "compression": "lzw"}, 1, "uint16"),
        ({"rowsperstrip": 64}, 3, "uint8"),
        ({"tile": (64, 64), "compression": "zlib", "bigtiff": True}, 1, "uint8"),
        ({"tile": (128, 128), "planarconfig": "separate"}, 3, "uint8"),
    ],
    ids=["tiled-rgb", "tiled-rgba-zstd", "striped-gray16-lzw", "striped-raw", "bigtiff", "planar"],
)
def test_tiff_regions_are_exact(tmp_path: Path, kwargs: dict, channels: int, dtype: str) -> None:
    pixels = coord_pixels(700, 900, channels, dtype)
    path = tmp_path / "src.tif"
    data = pixels[..., 0] if channels == 1 else pixels
    if kwargs.get("planarconfig") == "separate":
        data = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        kwargs = {**kwargs, "photometric": "rgb"}
    tifffile.imwrite(path, data, **kwargs)
    reader = open_source(path)
    assert isinstance(reader, TiffReader)
    assert reader.info.channels == channels
    assert reader.info.level_shapes[0] == (700, 900)
    np.testing.assert_array_equal(reader.read_region(0, *REGION), _expect(pixels, *REGION))


def test_region_past_the_edge_is_filled(tmp_path: Path) -> None:
    pixels = coord_pixels(100, 120)
    tifffile.imwrite(tmp_path / "a.tif", pixels, tile=(32, 32))
    region = open_source(tmp_path / "a.tif").read_region(0, 90, 110, 20, 20)
    np.testing.assert_array_equal(region[:, :10, :10], _expect(pixels, 90, 110, 10, 10))
    assert (region[:, 10:, :] == 0).all() and (region[:, :, 10:] == 0).all()


def test_pyramidal_ome_tiff_levels_and_pixel_size(tmp_path: Path) -> None:
    pixels = coord_pixels(1024, 768)
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            pixels,
            tile=(128, 128),
            subifds=1,
            photometric="rgb",
            metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "axes": "YXS"},
        )
        tw.write(pixels[::2, ::2], tile=(128, 128), subfiletype=1, photometric="rgb")
    reader = open_source(path)
    assert reader.info.level_shapes == ((1024, 768), (512, 384))
    assert reader.info.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(
        reader.read_region(1, 10, 20, 50, 60), _expect(pixels[::2, ::2], 10, 20, 50, 60)
    )


def test_png_and_jpeg(tmp_path: Path) -> None:
    from PIL import Image

    pixels = coord_pixels(200, 300)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    png = open_source(tmp_path / "a.png")
    assert isinstance(png, ImageFileReader)
    np.testing.assert_array_equal(png.read_region(0, 5, 6, 70, 80), _expect(pixels, 5, 6, 70, 80))
    jpg = open_source(tmp_path / "a.jpg").read_region(0, 0, 0, 200, 300).astype(int)
    assert np.abs(jpg - pixels.transpose(2, 0, 1)).mean() < 8  # lossy, but the same image


def test_svs_through_openslide(tmp_path: Path) -> None:
    pixels = coord_pixels(1024, 1024)
    path = tmp_path / "slide.svs"
    desc = "Aperio Image Library v12.0.0\n1024x1024 [0,0 1024x1024] (256x256) RAW|AppMag = 20|MPP = 0.5"
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", description=desc, metadata=None
    )
    reader = open_source(path)
    assert isinstance(reader, OpenSlideReader)
    assert reader.info.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(reader.read_region(0, *REGION), _expect(pixels, *REGION))


def _geotiff(path: Path, pixels: np.ndarray, origin: tuple[float, float], scale: float) -> None:
    tags = [
        (33550, "d", 3, (scale, scale, 0.0), False),  # ModelPixelScale
        (33922, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0), False),  # ModelTiepoint
        (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 32633), False),  # GeoKeys: EPSG:32633
    ]
    tifffile.imwrite(path, pixels, tile=(64, 64), extratags=tags)


def test_geotiff_mosaic_places_tiles_by_georeference(tmp_path: Path) -> None:
    full = coord_pixels(256, 384)
    paths = []
    for r in range(2):
        for c in range(3):
            p = tmp_path / f"tile_{r}_{c}.tif"
            piece = full[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]
            # 0.5 m pixels; world y grows upwards
            _geotiff(p, piece, (500000.0 + c * 64.0, 4000000.0 - r * 64.0), 0.5)
            paths.append(p)
    mosaic = MosaicReader("scene", list(reversed(paths)))
    assert mosaic.info.level_shapes[0] == (256, 384)
    assert mosaic.info.extra["crs"] == "EPSG:32633"
    assert mosaic.info.extra["geotransform"] == [500000.0, 0.5, 0.0, 4000000.0, 0.0, -0.5]
    np.testing.assert_array_equal(mosaic.read_region(0, 0, 0, 256, 384), full.transpose(2, 0, 1))


def test_mosaic_refuses_mixed_pixel_scales(tmp_path: Path) -> None:
    _geotiff(tmp_path / "a.tif", coord_pixels(64, 64), (0.0, 0.0), 0.5)
    _geotiff(tmp_path / "b.tif", coord_pixels(64, 64), (32.0, 0.0), 1.0)
    with pytest.raises(SourceError, match=r"b\.tif: pixel scale"):
        MosaicReader("m", [tmp_path / "a.tif", tmp_path / "b.tif"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"hello, not an image" * 10), "not a supported image format"),
        (lambda p: p.write_bytes(b"II*\x00" + b"\x00" * 50), "not a readable TIFF"),
    ],
    ids=["missing", "empty", "garbage", "broken-header"],
)
def test_bad_files_get_one_clear_error(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(SourceError, match=message) as info:
        open_source(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_tiff_is_named_before_tiling(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, coord_pixels(512, 512), tile=(128, 128), compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated"):
        open_source(path)


def test_corrupt_tile_data_names_the_region(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, coord_pixels(256, 256), tile=(128, 128), compression="zlib")
    reader = open_source(path)
    assert isinstance(reader, TiffReader)
    page = reader._pages[0]
    raw = bytearray(path.read_bytes())
    offset = page.dataoffsets[0]
    raw[offset : offset + 64] = b"\xff" * 64  # destroy the first tile's zlib stream
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=r"corrupt or truncated image data at level 0"):
        open_source(path).read_region(0, 0, 0, 64, 64)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    import struct
    import zlib

    from PIL import Image

    # a 16x16 PNG whose header is rewritten to claim 100000 x 100000 pixels (valid CRC)
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", 100_000, 100_000)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match="refusing 100000x100000"):
        open_source(path)


def test_pixel_limit_applies_to_tiled_sources(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", coord_pixels(100, 100), tile=(32, 32))
    with pytest.raises(SourceError, match="over the limit of 5,000"):
        open_source(tmp_path / "a.tif", max_pixels=5000)


def test_single_strip_tiff_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 20000² image stored as one strip would decode 400 MB at once: refused at open, named,
    before a byte of pixel data is read (the file is sparse: the header is all that exists)."""
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, shape=(20000, 20000), dtype=np.uint8, rowsperstrip=20000)
    with pytest.raises(
        SourceError, match=r"strip\.tif.*strips of 20000x20000.*381 MiB.*re-save it tiled"
    ):
        open_source(path)
    # strips of a few rows are fine: they decode one at a time
    tifffile.imwrite(tmp_path / "rows.tif", coord_pixels(64, 64), rowsperstrip=8)
    assert open_source(tmp_path / "rows.tif").info.level_shapes[0] == (64, 64)


def _header_only_tiff(path: Path, side: int, tile: int, byte_count: int) -> None:
    """A little-endian TIFF of one IFD claiming ``side``² 8-bit grey pixels in ``tile``² tiles
    but listing a single tile offset (what a truncated or hostile file carries)."""
    import struct

    tags = [  # (tag, type, value): 3 = SHORT, 4 = LONG
        (256, 4, side),
        (257, 4, side),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (277, 3, 1),
        (322, 3, tile),
        (323, 3, tile),
        (324, 4, 8),
        (325, 4, byte_count),
    ]
    entries = b"".join(
        struct.pack("<HHII", t, kind, 1, v)
        if kind == 4
        else struct.pack("<HHIHH", t, kind, 1, v, 0)
        for t, kind, v in tags
    )
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + b"\x00" * 4)


def test_a_header_claiming_200000_squared_pixels_is_refused_at_open(tmp_path: Path) -> None:
    """134 bytes claiming 200000² pixels (4·10¹⁰, under the pixel limit, as real slides are):
    the tile table the header lists cannot cover the image, so the file is refused at open
    without allocating anything, rather than when the first block fails to decode."""
    _header_only_tiff(tmp_path / "claim.tif", 200_000, 256, byte_count=10)
    with pytest.raises(
        SourceError,
        match=r"claim\.tif: .*1 tile offsets for a 200000x200000 "
        r"image of 611,524 tiles",
    ):
        open_source(tmp_path / "claim.tif")

"""JPEG pass-through: a JPEG-tiled source's tiles become the store's chunks undecoded. Each copied
level reads back exactly as tifffile decodes the source (YCbCr, RGB-coded as Aperio writes it,
gray, abbreviated tiles with shared tables), through zarr in a process that never imports
hiresctl and through the trainers' patch reader; the store's bytes are the tiles' bytes; a
source that cannot be copied is stored losslessly with one note saying why; a damaged tile
fails its image alone."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr

from hiresctl.data import PatchReader
from storage.codecs import decode_jpeg_chunk, encode_jpeg_chunk
from storage.pyramid import halve
from tests.ngff import assert_valid_ngff

TILE = 64


def _image(height: int, width: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients with texture: JPEG-friendly, yet every tile differs."""
    yy, xx = np.mgrid[0:height, 0:width]
    planes = [
        (yy * 255 // max(1, height - 1) + 20 * np.sin(xx / 11.0)),
        (xx * 255 // max(1, width - 1) + 20 * np.cos(yy / 13.0)),
        (128 + 100 * np.sin((yy + xx) / 17.0)),
    ][:channels]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8).squeeze()


def _levels(image: np.ndarray, smallest: int) -> list[np.ndarray]:
    """A 2× pyramid (every other pixel: the store's level shapes, rounded up)."""
    levels = [image]
    while max(levels[-1].shape[:2]) > smallest:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    return levels


def write_pyramid(path: Path, image: np.ndarray, tile: int = TILE, **options: Any) -> Path:
    """A pyramidal JPEG TIFF written by tifffile (one tiled page per level, SubIFDs)."""
    levels = _levels(image, 2 * tile)
    photometric = "minisblack" if image.ndim == 2 else "rgb"
    with tifffile.TiffWriter(path) as writer:
        for i, level in enumerate(levels):
            writer.write(
                level,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 90, **options},
                photometric=photometric,
                subifds=len(levels) - 1 if i == 0 else None,
                subfiletype=1 if i else 0,
            )
    return path


def _segments(stream: bytes) -> list[tuple[int, bytes]]:
    """A JPEG stream's marker segments up to (and with) its scan."""
    at, out = 2, []
    while stream[at + 1] != 0xDA:
        length = int.from_bytes(stream[at + 2 : at + 4], "big")
        out.append((stream[at + 1], stream[at : at + 2 + length]))
        at += 2 + length
    return [*out, (0xDA, stream[at:])]


def write_abbreviated(path: Path, image: np.ndarray) -> Path:
    """One level of abbreviated tiles whose quantisation tables live once in ``JPEGTables``, as
    libtiff-based writers (scanners, vips) store them."""
    height, width, _ = image.shape
    tiles, tables = [], b""
    for y in range(0, height, TILE):
        for x in range(0, width, TILE):
            tile = np.zeros((TILE, TILE, 3), np.uint8)
            part = image[y : y + TILE, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            parts = _segments(bytes(imagecodecs.jpeg8_encode(tile, level=85)))
            tables = b"\xff\xd8" + b"".join(s for m, s in parts if m == 0xDB) + b"\xff\xd9"
            tiles.append(b"\xff\xd8" + b"".join(s for m, s in parts if m != 0xDB))
    tifffile.imwrite(
        path,
        iter(tiles),
        shape=image.shape,
        dtype="uint8",
        tile=(TILE, TILE),
        compression="jpeg",
        photometric="ycbcr",
        subsampling=(2, 2),
        extratags=[(347, 7, len(tables), tables, True)],
    )
    return path


def _theirs(path: Path, level: int) -> np.ndarray:
    """``level`` of the source as tifffile decodes it, (c, y, x)."""
    pixels = tifffile.imread(path, level=level)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _tile(cli: Callable, store: Path, *sources: Path, codec: str | None = None) -> Any:
    extra = ["--codec", codec] if codec else []
    args = ["--chunk", str(TILE), "--block-size", str(4 * TILE), "--thumbnail-size", "48"]
    return cli("tile", *sources, "--out", store, "--json", *args, *extra)


def _level_bytes(store: Path, image: str, level: int) -> int:
    folder = store / "images" / image / str(level) / "c"
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


SOURCES = {
    "ycbcr": lambda path: write_pyramid(path, _image(300, 250)),
    "rgb-coded": lambda path: write_pyramid(path, _image(300, 250), outcolorspace="RGB"),
    "gray": lambda path: write_pyramid(path, _image(300, 250, channels=1)),
    "tables": lambda path: write_abbreviated(path, _image(300, 250)),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_copied_levels_read_back_exactly_as_the_source_decodes(
    cli: Callable, tmp_path: Path, kind: str
) -> None:
    source = SOURCES[kind](tmp_path / f"{kind}.tif")
    store = tmp_path / "ds.zarr"
    result = _tile(cli, store, source)  # the default codec: copied where it can be
    assert result.code == 0, result.stderr
    assert "note" not in json.loads(result.stdout)
    group = zarr.open_group(store / "images" / kind, mode="r")
    attrs = group.attrs["hiresctl"]
    copied = attrs["copied_levels"]
    with tifffile.TiffFile(source) as tif:
        source_levels = len(tif.series[0].levels)
        page = tif.pages[0]
        tile_bytes = sum(page.databytecounts)
        tables = len(page.jpegtables) - 4 if page.jpegtables else 0
        tiles = len(page.databytecounts)
    # the first pass writes levels 0-2 here (block 4 chunks); the source has them all
    assert attrs["tiling"]["codec"] == "passthrough"
    assert copied == min(3, source_levels)
    for level in range(copied):
        np.testing.assert_array_equal(group[str(level)][...], _theirs(source, level))
    # level 0's bytes are the source's tiles (tables merged into each), plus the shard indexes
    shards = -(-300 // (4 * TILE)) * -(-250 // (4 * TILE))
    index = shards * (16 * 4 * 4 + 4)
    assert _level_bytes(store, kind, 0) == tile_bytes + tiles * tables + index
    # a level above the copied ones is the 2×2 mean of the last copied one, as a JPEG (q 90)
    above = group[str(copied)][...]
    mean = halve(np.ascontiguousarray(group[str(copied - 1)][...]))
    assert above.shape == mean.shape
    for y in range(0, mean.shape[1], TILE):
        for x in range(0, mean.shape[2], TILE):
            part = mean[:, y : y + TILE, x : x + TILE]
            chunk = np.zeros((mean.shape[0], TILE, TILE), np.uint8)  # edges padded with 0s
            chunk[:, : part.shape[1], : part.shape[2]] = part
            coded = decode_jpeg_chunk(encode_jpeg_chunk(chunk, 90), chunk.shape)
            np.testing.assert_array_equal(
                above[:, y : y + TILE, x : x + TILE], coded[:, : part.shape[1], : part.shape[2]]
            )
    # the trainers' reader (straight to the chunk bytes) agrees with tifffile
    reader = PatchReader(store)
    np.testing.assert_array_equal(
        reader.read_region(kind, TILE, TILE, 2 * TILE), _theirs(source, 0)[:, 64:192, 64:192]
    )
    assert_valid_ngff(store)


def test_zarr_reads_a_copied_store_without_importing_hiresctl(
    cli: Callable, tmp_path: Path
) -> None:
    source = write_pyramid(tmp_path / "aperio.tif", _image(200, 180), outcolorspace="RGB")
    store = tmp_path / "ds.zarr"
    assert _tile(cli, store, source).code == 0
    np.save(tmp_path / "theirs.npy", _theirs(source, 0))
    check = (
        "import numpy, zarr\n"
        f"a = zarr.open_array({str(store)!r}, path='images/aperio/0', mode='r')[...]\n"
        f"assert (a == numpy.load({str(tmp_path / 'theirs.npy')!r})).all()\n"
    )  # zarr finds the codec through the installed package's entry point
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_tiles_that_cannot_be_chunks_are_stored_losslessly_with_one_note(
    cli: Callable, tmp_path: Path
) -> None:
    big_tiles = write_pyramid(tmp_path / "big.tif", _image(300, 250), tile=128)
    fits = write_pyramid(tmp_path / "fits.tif", _image(300, 250))
    store = tmp_path / "ds.zarr"
    result = _tile(cli, store, big_tiles, fits, codec="passthrough")
    assert result.code == 0, result.stderr
    rows = {row["id"]: row for row in map(json.loads, result.stdout.splitlines())}
    note = "JPEG tiles not copied: its JPEG tiles are 128×128, the store's chunks 64×64"
    assert rows["big"]["note"].startswith(note) and "--chunk 128" in rows["big"]["note"]
    assert "note" not in rows["fits"]
    assert result.stderr.count("its JPEG tiles are 128×128") == 2  # its line, the summary
    [line] = [line for line in result.stderr.splitlines() if "big.tif →" in line]
    assert line.startswith("written ") and "note JPEG tiles not copied" in line  # one line
    big = zarr.open_group(store / "images" / "big", mode="r")
    assert big.attrs["hiresctl"]["tiling"]["codec"] == "zstd"
    assert "copied_levels" not in big.attrs["hiresctl"]
    np.testing.assert_array_equal(big["0"][...], _theirs(big_tiles, 0))
    # asked for zstd, nothing is copied and nothing noted
    plain = tmp_path / "plain.zarr"
    result = _tile(cli, plain, fits, codec="zstd")
    assert result.code == 0 and "note" not in result.stdout
    assert "copied_levels" not in zarr.open_group(plain / "images" / "fits").attrs["hiresctl"]
    # the default (auto) takes that losslessly tiled image as it is: nothing is tiled again
    again = _tile(cli, plain, fits)
    assert again.code == 0 and json.loads(again.stdout)["status"] == "skipped"
    assert zarr.open_group(plain / "images" / "fits").attrs["hiresctl"]["tiling"]["codec"] == "zstd"


def test_a_truncated_tile_fails_its_image_alone(cli: Callable, tmp_path: Path) -> None:
    broken = write_pyramid(tmp_path / "broken.tif", _image(300, 250))
    good = write_pyramid(tmp_path / "good.tif", _image(200, 200))
    with tifffile.TiffFile(broken) as tif:
        page = tif.pages[0]
        end = page.dataoffsets[5] + page.databytecounts[5]
    with open(broken, "r+b") as handle:  # the end-of-image marker of tile 5 overwritten
        handle.seek(end - 2)
        handle.write(b"\x00\x00")
    store = tmp_path / "ds.zarr"
    result = _tile(cli, store, broken, good)
    assert result.code == 1
    line = "broken.tif: level 0 tile 5: truncated JPEG stream (no end-of-image marker)"
    assert line in result.stderr and "Traceback" not in result.stderr
    rows = {row["source"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert rows[str(good)]["status"] == "written" and rows[str(broken)]["status"] == "failed"
    status = zarr.open_group(store / "images" / "broken").attrs["hiresctl"]["status"]
    assert status == "incomplete"

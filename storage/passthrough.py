"""JPEG pass-through: a source's JPEG tiles become the store's chunks without being decoded.

A scanner's slide is JPEG already. Decoding it and encoding every chunk again either costs a
second generation of loss (``--codec jpeg``) or makes the store about 4× the slide (zstd).
Where a source level is tiled in JPEG on a grid that can be the store's chunk grid, its tiles
are copied: each chunk is the tile's own JPEG stream with the file's shared tables
(``JPEGTables``) merged in, so it is a complete JPEG any decoder reads, and the ``hiresctl.jpeg``
codec decodes it exactly as the source's reader (tifffile) decodes the tile. Levels are copied
from level 0 up for as long as the source holds a level of exactly the store's next shape (a 2×
pyramid); the levels above are computed from the last copied one, as the tiler always does, and
encoded as JPEG (quality ``--jpeg-quality``).

Copying needs: a TIFF read through tifffile, one page per level, tiles of the store's chunk size
(square, a power of two), 8-bit gray or RGB without extra samples, no resampling
(``--mpp``/``--mag``). :func:`plan_copy` says which levels can be copied or why none can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.errors import SourceError
from storage.source import SourceReader

__all__ = ["CopyPlan", "merge_tables", "plan_copy", "source_tile"]

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
# start-of-frame markers that carry the frame's size (all but DHT, JPG and DAC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class CopyPlan:
    """Store levels ``0 .. levels - 1`` are the source's own tiles (``levels`` 0: none);
    ``colorspace`` is the JPEG data's colour space where the decoder must be told (Aperio's RGB
    tiles), ``reason`` why no level (or no further level) is copied."""

    levels: int
    colorspace: str | None = None
    reason: str | None = None
    jpeg: bool = False  # the source is JPEG-tiled (a reason is then worth telling the user)


def plan_copy(
    reader: SourceReader,
    shapes: list[tuple[int, int]],
    chunk: int,
    resampled: bool,
) -> CopyPlan:
    """Which of the store's levels (of ``shapes``) can be the source's tiles, copied."""
    from storage.tiff import TiffReader

    if not isinstance(reader, TiffReader):
        return CopyPlan(0, reason="not a TIFF read through tifffile")
    page = reader.jpeg_page(0)
    if page is None:
        return CopyPlan(0, reason="level 0 is not one page of JPEG tiles")
    if resampled:
        return CopyPlan(0, reason="the image is resampled (--mpp/--mag)", jpeg=True)
    colorspace, why = _page_fits(page, chunk, reader.info.channels)
    if why is not None:
        return CopyPlan(0, reason=why, jpeg=True)
    levels = 1
    while levels < len(shapes) and levels < len(reader.info.level_shapes):
        page = reader.jpeg_page(levels)
        if page is None or tuple(reader.info.level_shapes[levels]) != tuple(shapes[levels]):
            break
        level_colorspace, why = _page_fits(page, chunk, reader.info.channels)
        if why is not None or level_colorspace != colorspace:
            break
        levels += 1
    return CopyPlan(levels, colorspace, jpeg=True)


def _page_fits(page: Any, chunk: int, channels: int) -> tuple[str | None, str | None]:
    """(colour space, None) when ``page``'s tiles can be chunks of side ``chunk``, else
    (None, why not)."""
    tile = (int(page.tilelength), int(page.tilewidth))
    if tile != (chunk, chunk):
        side = f"--chunk {tile[0]}" if tile[0] == tile[1] and not tile[0] & (tile[0] - 1) else None
        hint = f" (tile with {side} to copy them)" if side else ""
        return (
            None,
            f"its JPEG tiles are {tile[0]}×{tile[1]}, the store's chunks {chunk}×{chunk}{hint}",
        )
    if page.bitspersample != 8 or channels not in (1, 3):
        return (
            None,
            f"its JPEG tiles are {channels}-channel, {page.bitspersample}-bit (copied: 8-bit gray or RGB)",
        )
    if page.extrasamples or page.jpegheader is not None:
        return None, "its JPEG tiles carry extra samples or a shared header"
    photometric = int(page.photometric)
    if channels == 3 and photometric == 2 and not page.is_jfif:
        return "RGB", None  # RGB data without a JFIF marker (Aperio): tifffile decodes it so
    if (channels, photometric) not in ((3, 2), (3, 6), (1, 1)):
        return None, f"its JPEG tiles have photometric interpretation {photometric}"
    return None, None


def merge_tables(tile: bytes, tables: bytes | None) -> bytes:
    """An abbreviated JPEG stream with the file's tables (``SOI, DQT/DHT…, EOI``) put in after
    its SOI: a complete stream that decodes alone."""
    if not tables:
        return tile
    return tile[:2] + tables[2:-2] + tile[2:]


def source_tile(
    reader: SourceReader, level: int, row: int, col: int, shape: tuple[int, int, int]
) -> bytes | None:
    """Tile (``row``, ``col``) of the source's ``level`` as a complete JPEG stream, checked
    for truncation and size without decoding; None where the file never wrote it."""
    from storage.tiff import TiffReader

    assert isinstance(reader, TiffReader)
    page = reader.jpeg_page(level)
    assert page is not None
    index = row * int(page.chunked[1]) + col
    raw = reader.raw_segment(level, index)
    if raw is None:
        return None
    data = merge_tables(raw, page.jpegtables)
    problem = _check_stream(data, shape)
    if problem is not None:
        raise SourceError(reader.info.path, f"level {level} tile {index}: {problem}")
    return data


def _check_stream(data: bytes, shape: tuple[int, int, int]) -> str | None:
    """Why ``data`` is not a whole JPEG of ``shape`` (c, h, w) (markers only), else None."""
    if not data.startswith(_SOI):
        return "not a JPEG stream (no start-of-image marker)"
    if not data.rstrip(b"\x00").endswith(_EOI):
        return "truncated JPEG stream (no end-of-image marker)"
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return f"corrupt JPEG stream (no marker at byte {at})"
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF:
            if at + 10 > len(data):
                break
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            components = data[at + 9]
            if (components, height, width) != shape:
                return (
                    f"a JPEG frame of {components} component(s) {height}×{width}, "
                    f"not the tile's {shape[0]} × {shape[1]}×{shape[2]}"
                )
            return None
        if marker == 0xDA:  # start of scan before any frame header
            break
        at += 2 + length
    return "corrupt JPEG stream (no frame header)"

"""Source readers: one interface over TIFF/OME-TIFF, OpenSlide formats, PNG/JPEG and GeoTIFF mosaics.

Every reader answers ``read_region(level, y, x, height, width)`` with a channel-first
``(c, height, width)`` array and never decodes more of the file than the region needs (tiled and
striped TIFFs decode only the tiles or strips the region touches). Regions that reach past the
image edge are padded with the reader's ``fill_value``.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import SourceError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageFileReader",
    "OpenSlideReader",
    "SourceReader",
    "TiffReader",
    "open_source",
]

#: Refuse sources whose level 0 has more pixels than this (decompression bombs); 2**37 ≈ 137
#: gigapixels, larger than any scanner writes. Override with ``max_pixels``.
DEFAULT_MAX_PIXELS = 2**37
#: Formats without tiles are decoded whole, so they get a much smaller limit.
MAX_UNTILED_PIXELS = 2**29
#: A TIFF strip or tile is the smallest unit that can be decoded; one larger than this
#: (decoded) would have to sit in memory whole: a single-strip scan, or a header that lies.
MAX_SEGMENT_BYTES = 2**28

# tifffile logs what it can still recover from; our errors name the file and the problem instead
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif"}


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a reader knows about its source, independent of the format."""

    path: str
    channels: int
    dtype: str
    level_shapes: tuple[tuple[int, int], ...]  # (height, width) per level, level 0 first
    mpp: float | None  # µm per pixel at level 0, when the file says
    fill_value: int
    extra: dict[str, Any] = field(default_factory=dict)  # CRS, geotransform, vendor, ...


class SourceReader(abc.ABC):
    """Region access to one source image, channel first."""

    info: SourceInfo
    #: (height, width) of the level-0 piece the source decodes at once (a TIFF tile or strip),
    #: when known: the tiler reads in whole multiples of it.
    read_unit: tuple[int, int] | None = None
    #: True when ``_read`` returns arrays of its own (not views of a cache): a region wholly
    #: inside the image is then returned as read, without a copy.
    fresh_reads: bool = False

    @abc.abstractmethod
    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Read an in-bounds region as (c, height, width)."""

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Read a region of ``level``; parts outside the image are ``fill_value``.

        The result is (c, height, width) but not necessarily C-contiguous: it is laid out
        channel-last in memory (a transposed view), the order of interleaved sources and of the
        JPEG codec, unless a reader with ``fresh_reads`` returns a planar source's own layout.
        Copying a decoded region in and cutting it into chunks for the encoder are then plain
        row copies."""
        level_h, level_w = self.info.level_shapes[level]
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + height, level_h), min(x + width, level_w)
        inside = (y0, x0, y1, x1) == (y, x, y + height, x + width)
        if y1 <= y0 or x1 <= x0:
            return np.full(
                (height, width, self.info.channels), self.info.fill_value, self.info.dtype
            ).transpose(2, 0, 1)
        try:
            data = self._read(level, y0, x0, y1 - y0, x1 - x0)
        except SourceError:
            raise
        except Exception as exc:  # decoder errors from codecs: name the file and the region
            raise SourceError(
                self.info.path,
                f"corrupt or truncated image data at level {level}, region y={y0} x={x0} "
                f"({y1 - y0}x{x1 - x0}): {type(exc).__name__}: {exc}",
            ) from exc
        if inside and self.fresh_reads and data.dtype == np.dtype(self.info.dtype):
            return data
        shape = (height, width, self.info.channels)
        out = (
            np.empty(shape, self.info.dtype)
            if inside
            else np.full(shape, self.info.fill_value, self.info.dtype)
        ).transpose(2, 0, 1)
        out[:, y0 - y : y1 - y, x0 - x : x1 - x] = data
        return out

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_size(path: str, height: int, width: int, limit: int) -> None:
    if height <= 0 or width <= 0:
        raise SourceError(path, f"image has no pixels ({height}x{width})")
    if height * width > limit:
        raise SourceError(
            path,
            f"refusing {height}x{width} = {height * width:,} pixels: over the limit of "
            f"{limit:,} (a decompression bomb or a corrupt header; raise --max-pixels if real)",
        )


# --------------------------------------------------------------------------------------- TIFF


def _tiff_resolution_mpp(page: Any) -> float | None:
    """Pixel size from XResolution/ResolutionUnit (µm), if the file states a real one."""
    try:
        res = page.tags["XResolution"].value
        unit = int(page.tags["ResolutionUnit"].value)
    except KeyError:
        return None
    num, den = res if isinstance(res, tuple) else (res, 1)
    if not num or not den:
        return None
    per_unit = num / den
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
    if um_per_unit is None or per_unit <= 1:
        return None  # unit "none" or the 72-dpi default of image editors
    mpp = um_per_unit / per_unit
    return mpp if 0.01 < mpp < 1e6 else None


def _svs_mpp(description: str) -> float | None:
    for part in description.split("|"):
        key, _, value = part.partition("=")
        if key.strip() == "MPP":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _geokeys(page: Any) -> dict[str, Any]:
    """Georeferencing of a GeoTIFF page: tiepoint, pixel scale, CRS (EPSG code when given)."""
    tags = page.tags
    if "ModelPixelScaleTag" not in tags or "ModelTiepointTag" not in tags:
        return {}
    scale = [float(v) for v in tags["ModelPixelScaleTag"].value]
    tie = [float(v) for v in tags["ModelTiepointTag"].value]
    geo: dict[str, Any] = {"pixel_scale": scale[:2], "tiepoint": tie[:6]}
    keys = tags.get("GeoKeyDirectoryTag")
    if keys is not None:
        values = list(keys.value)
        for i in range(4, len(values) - 3, 4):
            key_id, location, _count, value = values[i : i + 4]
            if location == 0 and key_id in (3072, 2048) and value not in (0, 32767):
                geo["crs"] = f"EPSG:{value}"
                if key_id == 3072:
                    break
    return geo


class TiffReader(SourceReader):
    """TIFF, BigTIFF, OME-TIFF and GeoTIFF through tifffile: pyramidal or flat, tiled or striped.

    Regions are read through tifffile's Zarr view of each level, which decodes only the tiles
    or strips a region touches.
    """

    fresh_reads = True

    def __init__(self, path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        import tifffile
        import zarr

        self.path = str(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except Exception as exc:
            raise SourceError(self.path, f"not a readable TIFF: {exc}") from exc
        axes = series.axes
        self._axes = axes
        keep = set("YXSC")
        for ax, n in zip(axes, series.shape, strict=True):
            if ax not in keep and n > 1:
                raise SourceError(
                    self.path,
                    f"has a {ax} axis of size {n} (axes {axes}); only 2-D images with channels "
                    "are supported: export one plane",
                )
        if "Y" not in axes or "X" not in axes:
            raise SourceError(self.path, f"has no Y/X axes (axes {axes})")
        if "S" in axes and "C" in axes and series.shape[axes.index("C")] > 1:
            raise SourceError(self.path, f"has both sample and channel axes (axes {axes})")
        self._check_truncation(series)
        levels = list(series.levels)
        shapes: list[tuple[int, int]] = []
        for lvl in levels:
            shape = dict(zip(lvl.axes, lvl.shape, strict=True))
            shapes.append((int(shape["Y"]), int(shape["X"])))
        _check_size(self.path, *shapes[0], max_pixels)
        # Fast path: one contiguous page per level, decoded segment by segment with pread.
        # Anything else (planar channels, one page per channel) goes through tifffile's Zarr view.
        self._pages: list[Any] = []
        self._arrays: list[Any] = []
        for i, lvl in enumerate(levels):
            page = lvl.keyframe
            self._check_segment(page, shapes[i])
            fast = len(lvl.pages) == 1 and (page.planarconfig == 1 or page.samplesperpixel == 1)
            if fast and len(page.chunked) == 3 and page.chunked[2] == 1:
                self._pages.append(page)
                self._arrays.append(None)
            else:
                try:
                    self._arrays.append(zarr.open_array(series.aszarr(level=i), mode="r"))
                except Exception as exc:
                    raise SourceError(self.path, f"cannot map TIFF data: {exc}") from exc
                self._pages.append(None)
        if self._pages[0] is not None:
            self.read_unit = (int(self._pages[0].chunks[0]), int(self._pages[0].chunks[1]))
        self._fd = os.open(self.path, os.O_RDONLY)
        # Drop levels that do not shrink (some writers repeat the base as a "level").
        good = [0] + [i for i in range(1, len(shapes)) if shapes[i][0] < shapes[0][0]]
        self._arrays = [self._arrays[i] for i in good]
        self._pages = [self._pages[i] for i in good]
        shapes = [shapes[i] for i in good]
        channel_axis = "S" if "S" in axes else ("C" if "C" in axes else None)
        channels = int(series.shape[axes.index(channel_axis)]) if channel_axis else 1
        self._channel_axis = channel_axis
        first: Any = series.pages[0] if series.pages else self._tif.pages[0]
        mpp = self._mpp(first)
        extra: dict[str, Any] = {"format": "tiff"}
        geo = _geokeys(first)
        if geo:
            extra["geo"] = geo
        if series.kind:
            extra["tiff_kind"] = series.kind
        dtype = np.dtype(series.dtype)
        if dtype.kind not in "ui" or dtype.itemsize > 2:
            raise SourceError(self.path, f"pixel type {dtype} is not supported (8/16-bit only)")
        self.info = SourceInfo(
            path=self.path,
            channels=channels,
            dtype=dtype.str,
            level_shapes=tuple(shapes),
            mpp=mpp,
            fill_value=0,
            extra=extra,
        )
        self._lock = threading.Lock()

    def _check_segment(self, page: Any, shape: tuple[int, int]) -> None:
        """Refuse, from the header alone, a level whose strips or tiles are too large to decode
        one at a time within :data:`MAX_SEGMENT_BYTES`."""
        chunk = [int(v) for v in page.chunks]
        decoded = int(np.prod(chunk)) * np.dtype(page.dtype).itemsize
        if decoded > MAX_SEGMENT_BYTES:
            kind = "tile" if page.is_tiled else "strip"
            raise SourceError(
                self.path,
                f"a {shape[0]}x{shape[1]} level stored in {kind}s of {chunk[0]}x{chunk[1]} "
                f"pixels: one {kind} decodes to {decoded / 2**20:,.0f} MiB, over the "
                f"{MAX_SEGMENT_BYTES // 2**20} MiB a reader may hold at once; re-save it tiled "
                "(e.g. `vips tiffsave IN OUT --tile --pyramid`)",
            )

    def _check_truncation(self, series: Any) -> None:
        size = os.path.getsize(self.path)
        for page in series.pages:
            if page is None:
                continue
            offsets, counts = page.dataoffsets, page.databytecounts
            if not offsets or len(offsets) != len(counts):
                raise SourceError(
                    self.path, "truncated or corrupt: the image data offsets are missing"
                )
            expected = int(np.prod(page.chunked))
            if len(offsets) < expected:
                kind = "tile" if page.is_tiled else "strip"
                raise SourceError(
                    self.path,
                    f"truncated or corrupt: the header lists {len(offsets):,} {kind} offsets for "
                    f"a {page.shape[0]}x{page.shape[1]} image of {expected:,} {kind}s",
                )
            end = max(o + c for o, c in zip(offsets, counts, strict=True))
            if end > size:
                raise SourceError(
                    self.path,
                    f"truncated: image data runs to byte {end:,} but the file has {size:,} bytes",
                )

    def _mpp(self, page: Any) -> float | None:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            import re

            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            if m:
                value = float(m.group(1))
                scale = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(
                    unit.group(1) if unit else "µm", 1.0
                )
                return value * scale
        if tif.is_svs:
            return _svs_mpp(page.description)
        return _tiff_resolution_mpp(page)

    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        page = self._pages[level]
        if page is not None:
            return self._read_segments(page, y, x, height, width)
        arr = self._arrays[level]
        index: list[Any] = []
        for ax in self._axes:
            if ax == "Y":
                index.append(slice(y, y + height))
            elif ax == "X":
                index.append(slice(x, x + width))
            elif ax == self._channel_axis:
                index.append(slice(None))
            else:
                index.append(0)
        data = np.asarray(arr[tuple(index)])
        kept = [ax for ax in self._axes if ax in ("Y", "X", self._channel_axis)]
        if self._channel_axis is None:
            return data[None]
        return np.transpose(
            data, (kept.index(self._channel_axis), kept.index("Y"), kept.index("X"))
        )

    def _read_segments(self, page: Any, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Decode only the tiles/strips that intersect the region (thread-safe: pread)."""
        seg_h, seg_w = int(page.chunks[0]), int(page.chunks[1])
        n_cols = int(page.chunked[1])
        if (height, width) == (seg_h, seg_w) and y % seg_h == 0 and x % seg_w == 0:
            seg = self._segment(page, (y // seg_h) * n_cols + x // seg_w)
            if seg is not None and seg.shape[:2] == (height, width):
                return seg.transpose(2, 0, 1)  # exactly one whole segment: no copy
        out = np.zeros((height, width, self.info.channels), dtype=self.info.dtype)
        for row in range(y // seg_h, (y + height - 1) // seg_h + 1):
            for col in range(x // seg_w, (x + width - 1) // seg_w + 1):
                seg = self._segment(page, row * n_cols + col)
                if seg is None:
                    continue  # sparse file: segment never written, reads as zeros
                top, left = row * seg_h, col * seg_w
                y0, x0 = max(y, top), max(x, left)
                y1 = min(y + height, top + seg.shape[0])
                x1 = min(x + width, left + seg.shape[1])
                out[y0 - y : y1 - y, x0 - x : x1 - x] = seg[
                    y0 - top : y1 - top, x0 - left : x1 - left
                ]
        return out.transpose(2, 0, 1)

    def _segment(self, page: Any, index: int) -> np.ndarray | None:
        """One decoded tile or strip as (h, w, c), None when the file never wrote it."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            return None
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise SourceError(self.path, f"truncated: segment {index} is cut short")
        seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return seg.reshape(seg.shape[-3:])

    def close(self) -> None:
        self._tif.close()
        os.close(self._fd)


# ---------------------------------------------------------------------------------- OpenSlide


class OpenSlideReader(SourceReader):
    """Vendor whole-slide formats (SVS, NDPI, MRXS, SCN, ...) through openslide-python.

    OpenSlide returns premultiplied RGBA; transparent (unscanned) areas become white, the
    background of a slide.
    """

    def __init__(self, path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        import openslide

        self.path = str(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as exc:
            raise SourceError(self.path, f"OpenSlide cannot open it: {exc}") from exc
        dims = self._slide.level_dimensions
        shapes = tuple((int(h), int(w)) for w, h in dims)
        _check_size(self.path, *shapes[0], max_pixels)
        props = self._slide.properties
        mpp: float | None
        try:
            mpp = float(props["openslide.mpp-x"])
        except (KeyError, ValueError):
            mpp = None
        self._downsamples = self._slide.level_downsamples
        self.info = SourceInfo(
            path=self.path,
            channels=3,
            dtype="|u1",
            level_shapes=shapes,
            mpp=mpp,
            fill_value=255,
            extra={
                "format": "openslide",
                "vendor": props.get("openslide.vendor", ""),
                "objective_power": props.get("openslide.objective-power"),
            },
        )

    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        ds = self._downsamples[level]
        # read_region takes level-0 coordinates for the top-left corner
        region = self._slide.read_region((round(x * ds), round(y * ds)), level, (width, height))
        rgba = np.asarray(region)
        alpha = rgba[..., 3:4].astype(np.uint16)
        # premultiplied: composite onto white
        rgb = rgba[..., :3].astype(np.uint16) + (255 - alpha)
        return np.clip(rgb, 0, 255).astype(np.uint8).transpose(2, 0, 1)

    def close(self) -> None:
        self._slide.close()


# ------------------------------------------------------------------------------------ PNG/JPEG


class ImageFileReader(SourceReader):
    """PNG, JPEG and other untiled formats through Pillow; decoded whole, so size-limited."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_pixels: int = MAX_UNTILED_PIXELS,
        labels: bool = False,
    ) -> None:
        from PIL import Image

        self.path = str(path)
        # Our own limit below applies (and names --max-pixels); Pillow's own check would refuse
        # a large header first, with its limit, from Pillow 13 on already at open.
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(self.path) as probe:
                width, height = probe.size
                mode = probe.mode
        except Exception as exc:
            raise SourceError(self.path, f"not a readable image: {exc}") from exc
        _check_size(self.path, height, width, min(max_pixels, MAX_UNTILED_PIXELS))
        self._mode = {"1": "L", "P": "RGBA", "LA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}.get(
            mode, mode
        )
        if labels and mode == "P":  # a label image keeps its palette indices as the labels
            self._mode = "P"
        if self._mode not in ("L", "RGB", "RGBA", "I;16", "I", "P"):
            raise SourceError(self.path, f"pixel mode {mode} is not supported")
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()
        channels = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4, "I;16": 1, "I": 1}[self._mode]
        dtype = "|u1" if self._mode in ("L", "P", "RGB", "RGBA") else "<u2"
        self.info = SourceInfo(
            path=self.path,
            channels=channels,
            dtype=dtype,
            level_shapes=((height, width),),
            mpp=None,
            fill_value=0,
            extra={"format": "image"},
        )

    def _decode(self) -> np.ndarray:
        from PIL import Image

        with self._lock:
            if self._pixels is None:
                Image.MAX_IMAGE_PIXELS = None  # size already checked against our own limit
                with Image.open(self.path) as img:
                    decoded = img.convert(self._mode) if img.mode != self._mode else img
                    arr = np.asarray(decoded)
                if self._mode in ("I", "I;16"):
                    arr = arr.astype(np.uint16)
                self._pixels = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            return self._pixels

    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        return self._decode()[:, y : y + height, x : x + width]


# -------------------------------------------------------------------------------------- mosaic


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PIL_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8", b"RIFF")


@dataclass(frozen=True)
class SourceFormat:
    """One family of source files: its name, the suffixes a folder is searched for, how a file
    is recognised from its content (``sniff(path, first 16 bytes)``) and its reader."""

    name: str
    suffixes: frozenset[str]
    sniff: Callable[[Path, bytes], bool]
    opener: Callable[[Path, int, bool], SourceReader]


def _is_slide(path: Path, head: bytes) -> bool:
    vendor = _openslide_vendor(path)
    return vendor is not None and vendor != "generic-tiff"


#: Every source format, in the order a file is tried against them (the first that recognises
#: its content opens it; the name never decides alone). A new format is one entry here.
SOURCE_FORMATS: tuple[SourceFormat, ...] = (
    SourceFormat("whole-slide image (OpenSlide: SVS, NDPI, MRXS, SCN, VMS, BIF)",
                 frozenset(OPENSLIDE_SUFFIXES - {".tif"}), _is_slide,
                 lambda path, max_pixels, labels: OpenSlideReader(path, max_pixels)),
    SourceFormat("TIFF/OME-TIFF/BigTIFF", frozenset({".tif", ".tiff", ".btf", ".tf8"}),
                 lambda path, head: head[:4] in _TIFF_MAGIC,
                 lambda path, max_pixels, labels: TiffReader(path, max_pixels)),
    SourceFormat("PNG, JPEG, BMP, GIF or WebP",
                 frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}),
                 lambda path, head: head.startswith(_PIL_MAGIC),
                 lambda path, max_pixels, labels: ImageFileReader(path, max_pixels, labels=labels)),
)  # fmt: skip


def source_suffixes() -> frozenset[str]:
    """The suffixes of every source format (what a folder given as input is searched for)."""
    return frozenset().union(*(f.suffixes for f in SOURCE_FORMATS))


def open_source(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS, labels: bool = False
) -> SourceReader:
    """Open any supported source file, choosing the reader from its content, not its name.

    With ``labels`` the file is a label image: palette images keep their indices."""
    p = Path(path)
    if not p.exists():
        raise SourceError(p, "file not found")
    if p.is_dir():
        raise SourceError(p, "is a folder (give image files, or use --mosaic for GeoTIFF tiles)")
    size = p.stat().st_size
    if size == 0:
        raise SourceError(p, "empty file (0 bytes)")
    with open(p, "rb") as fh:
        head = fh.read(16)
    for source_format in SOURCE_FORMATS:
        if source_format.sniff(p, head):
            return source_format.opener(p, max_pixels, labels)
    names = "; ".join(f.name for f in SOURCE_FORMATS)
    raise SourceError(p, f"not a supported image format (expected {names})")


def _openslide_vendor(path: Path) -> str | None:
    if path.suffix.lower() not in OPENSLIDE_SUFFIXES:
        return None
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # no OpenSlide library, or a file it does not know
        return None

"""Source readers: one interface over TIFF/OME-TIFF, OpenSlide formats, PNG/JPEG and GeoTIFF mosaics.

Every reader answers ``read_region(level, y, x, height, width)`` with a channel-first
``(c, height, width)`` array and never decodes more of the file than the region needs (tiled and
striped TIFFs decode only the tiles or strips the region touches). Regions that reach past the
image edge are padded with the reader's ``fill_value``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import czi, dicom
from storage.errors import SourceError
from storage.source import (
    DEFAULT_MAX_PIXELS,
    MAX_UNTILED_PIXELS,
    SourceInfo,
    SourceReader,
    check_size,
)
from storage.tiff import TiffReader

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageFileReader",
    "OpenSlideReader",
    "SourceInfo",
    "SourceReader",
    "TiffReader",
    "open_source",
]

OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif"}


# ---------------------------------------------------------------------------------- OpenSlide


class OpenSlideReader(SourceReader):
    """Vendor whole-slide formats (SVS, NDPI, MRXS, SCN, ...) through openslide-python.

    OpenSlide returns premultiplied RGBA; transparent (unscanned) areas become white, the
    background of a slide.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str | os.PathLike[str] | None = None,
    ) -> None:
        """``name``: what errors and the image call the source (a DICOM series' folder, opened
        through one of its instances)."""
        import openslide

        self.path = str(name or path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise SourceError(self.path, f"OpenSlide cannot open it: {exc}") from exc
        dims = self._slide.level_dimensions
        shapes = tuple((int(h), int(w)) for w, h in dims)
        check_size(self.path, *shapes[0], max_pixels)
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
        check_size(self.path, height, width, min(max_pixels, MAX_UNTILED_PIXELS))
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
    SourceFormat(
        "DICOM whole-slide image (a series of instances, through OpenSlide 4)",
        dicom.SUFFIXES,
        lambda path, head: dicom.is_dicom(path, head),
        lambda path, max_pixels, labels: _dicom_slide(path, max_pixels),
    ),
    SourceFormat(
        "Zeiss CZI (pylibCZIrw)",
        czi.SUFFIXES,
        lambda path, head: czi.is_czi(head),
        lambda path, max_pixels, labels: czi.CziReader(path, max_pixels),
    ),
    SourceFormat(
        "whole-slide image (OpenSlide: SVS, NDPI, MRXS, SCN, VMS, BIF)",
        frozenset(OPENSLIDE_SUFFIXES - {".tif"}),
        _is_slide,
        lambda path, max_pixels, labels: OpenSlideReader(path, max_pixels),
    ),
    SourceFormat(
        "TIFF/OME-TIFF/BigTIFF",
        frozenset({".tif", ".tiff", ".btf", ".tf8", ".qptiff"}),
        lambda path, head: head[:4] in _TIFF_MAGIC,
        lambda path, max_pixels, labels: TiffReader(path, max_pixels),
    ),
    SourceFormat(
        "PNG, JPEG, BMP, GIF or WebP",
        frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}),
        lambda path, head: head.startswith(_PIL_MAGIC),
        lambda path, max_pixels, labels: ImageFileReader(path, max_pixels, labels=labels),
    ),
)


def _dicom_slide(path: Path, max_pixels: int) -> SourceReader:
    dicom.check_slide(path)
    return OpenSlideReader(path, max_pixels)


def source_suffixes() -> frozenset[str]:
    """The suffixes of every source format (what a folder given as input is searched for)."""
    return frozenset().union(*(f.suffixes for f in SOURCE_FORMATS))


def open_source(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    labels: bool = False,
    scene: int | None = None,
) -> SourceReader:
    """Open any supported source file, choosing the reader from its content, not its name.

    With ``labels`` the file is a label image: palette images keep their indices. ``scene``:
    one scene of a multi-scene file (CZI)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(p, "file not found")
    if scene is not None:
        return czi.CziReader(p, max_pixels, scene)
    if p.is_dir():
        if not dicom.instances(p):
            raise SourceError(
                p, "is a folder (give image files, or use --mosaic for GeoTIFF tiles)"
            )
        entry = dicom.series_entry(p)
        dicom.check_slide(entry)
        return OpenSlideReader(entry, max_pixels, name=p)
    size = p.stat().st_size
    if size == 0:
        raise SourceError(p, "empty file (0 bytes)")
    with open(p, "rb") as fh:
        head = fh.read(dicom.MAGIC_OFFSET + 4)  # DICOM's magic follows a 128-byte preamble
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

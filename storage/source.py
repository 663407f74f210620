"""The source reader interface: what every reader of a source format answers (its levels,
pixel size, data type, ``read_region``), and the limits a source must keep to be opened."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.errors import SourceError

#: Refuse sources whose level 0 has more pixels than this (decompression bombs); 2**37 ≈ 137
#: gigapixels, larger than any scanner writes. Override with ``max_pixels``.
DEFAULT_MAX_PIXELS = 2**37
#: Formats without tiles are decoded whole, so they get a much smaller limit.
MAX_UNTILED_PIXELS = 2**29
#: A TIFF strip or tile is the smallest unit that can be decoded; one larger than this
#: (decoded) would have to sit in memory whole: a single-strip scan, or a header that lies.
MAX_SEGMENT_BYTES = 2**28


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


def check_size(path: str, height: int, width: int, limit: int) -> None:
    if height <= 0 or width <= 0:
        raise SourceError(path, f"image has no pixels ({height}x{width})")
    if height * width > limit:
        raise SourceError(
            path,
            f"refusing {height}x{width} = {height * width:,} pixels: over the limit of "
            f"{limit:,} (a decompression bomb or a corrupt header; raise --max-pixels if real)",
        )


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_SEGMENT_BYTES",
    "MAX_UNTILED_PIXELS",
    "SourceInfo",
    "SourceReader",
    "check_size",
]

"""Readers built from other readers: a mosaic of GeoTIFF tiles read as one image, and a view
of any source resampled to a target pixel size (``--mpp``/``--mag``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from storage.errors import SourceError
from storage.source import DEFAULT_MAX_PIXELS, SourceInfo, SourceReader, check_size
from storage.tiff import TiffReader

__all__ = ["MosaicReader", "ResampledReader"]


class MosaicReader(SourceReader):
    """GeoTIFF tiles placed on one canvas by their georeferencing (ModelTiepoint/PixelScale).

    All tiles must share the pixel scale and CRS. The canvas's geotransform (GDAL order:
    origin x, pixel width, 0, origin y, 0, -pixel height) and CRS are kept in ``info.extra``.
    """

    def __init__(
        self,
        name: str,
        paths: Sequence[str | os.PathLike[str]],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not paths:
            raise SourceError(name, "mosaic has no tiles")
        self.path = name
        self._tiles: list[tuple[TiffReader, int, int]] = []
        readers = [TiffReader(p, max_pixels) for p in paths]
        geos = []
        for r in readers:
            geo = r.info.extra.get("geo")
            if not geo:
                raise SourceError(r.path, "mosaic tile has no georeferencing (ModelTiepoint)")
            geos.append(geo)
        scale = geos[0]["pixel_scale"]
        crs = geos[0].get("crs")
        for r, g in zip(readers, geos, strict=True):
            if not np.allclose(g["pixel_scale"], scale, rtol=1e-6):
                raise SourceError(
                    r.path, f"pixel scale {g['pixel_scale']} differs from the mosaic's {scale}"
                )
            if g.get("crs") != crs:
                raise SourceError(r.path, f"CRS {g.get('crs')} differs from the mosaic's {crs}")
            if r.info.channels != readers[0].info.channels or r.info.dtype != readers[0].info.dtype:
                raise SourceError(r.path, "channels or pixel type differ from the first tile")
        sx, sy = scale
        # World coordinate of each tile's top-left pixel corner
        origins = []
        for g in geos:
            i, j, _k, wx, wy, _wz = g["tiepoint"]
            origins.append((wx - i * sx, wy + j * sy))
        min_x = min(o[0] for o in origins)
        max_y = max(o[1] for o in origins)
        height = width = 0
        for r, (ox, oy) in zip(readers, origins, strict=True):
            col = round((ox - min_x) / sx)
            row = round((max_y - oy) / sy)
            h, w = r.info.level_shapes[0]
            self._tiles.append((r, row, col))
            height, width = max(height, row + h), max(width, col + w)
        check_size(name, height, width, max_pixels)
        first = readers[0].info
        self.info = SourceInfo(
            path=name,
            channels=first.channels,
            dtype=first.dtype,
            level_shapes=((height, width),),
            mpp=None,
            fill_value=0,
            extra={
                "format": "geotiff-mosaic",
                "tiles": [r.path for r in readers],
                "crs": crs,
                "geotransform": [min_x, sx, 0.0, max_y, 0.0, -sy],
            },
        )

    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        out = np.full((self.info.channels, height, width), 0, dtype=self.info.dtype)
        for reader, row, col in self._tiles:
            th, tw = reader.info.level_shapes[0]
            y0, x0 = max(y, row), max(x, col)
            y1, x1 = min(y + height, row + th), min(x + width, col + tw)
            if y1 > y0 and x1 > x0:
                out[:, y0 - y : y1 - y, x0 - x : x1 - x] = reader.read_region(
                    0, y0 - row, x0 - col, y1 - y0, x1 - x0
                )
        return out

    def close(self) -> None:
        for reader, _, _ in self._tiles:
            reader.close()


# --------------------------------------------------------------------------------- resampling


class ResampledReader(SourceReader):
    """A source seen at another pixel size: reads the finest level at or finer than the target
    and resizes (area averaging; ``nearest`` for label images, whose values must not mix),
    region by region."""

    def __init__(
        self, base: SourceReader, target_mpp: float, base_mpp: float, nearest: bool = False
    ) -> None:
        if target_mpp <= 0 or base_mpp <= 0:
            raise SourceError(base.info.path, "pixel sizes must be positive")
        self.base = base
        self.nearest = nearest
        shapes = base.info.level_shapes
        h0, _w0 = shapes[0]
        level_mpps = [base_mpp * (h0 / h) for h, _ in shapes]
        # finest level whose pixels are not coarser than the target
        candidates = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + 1e-6)]
        self.level = max(candidates) if candidates else 0
        self.factor = target_mpp / level_mpps[self.level]  # source pixels per output pixel
        lh, lw = shapes[self.level]
        height, width = max(1, round(lh / self.factor)), max(1, round(lw / self.factor))
        self.info = SourceInfo(
            path=base.info.path,
            channels=base.info.channels,
            dtype=base.info.dtype,
            level_shapes=((height, width),),
            mpp=target_mpp,
            fill_value=base.info.fill_value,
            extra={**base.info.extra, "resampled_from_mpp": base_mpp, "read_level": self.level},
        )

    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        f = self.factor
        if abs(f - 1) < 1e-9:
            return self.base.read_region(self.level, y, x, height, width)
        sy0, sx0 = math.floor(y * f), math.floor(x * f)
        sy1, sx1 = math.ceil((y + height) * f), math.ceil((x + width) * f)
        src = self.base.read_region(self.level, sy0, sx0, sy1 - sy0, sx1 - sx0)
        if self.nearest:  # the source pixel under each output pixel's centre
            rows = np.minimum(
                np.floor((np.arange(y, y + height) + 0.5) * f).astype(int) - sy0, src.shape[1] - 1
            )
            cols = np.minimum(
                np.floor((np.arange(x, x + width) + 0.5) * f).astype(int) - sx0, src.shape[2] - 1
            )
            return src[:, rows[:, None], cols[None, :]]
        return _resize_region(src, (y * f - sy0, x * f - sx0), f, height, width)

    def close(self) -> None:
        self.base.close()


def _resize_region(
    src: np.ndarray, offset: tuple[float, float], factor: float, height: int, width: int
) -> np.ndarray:
    """Resample ``src`` (c, h, w) so output pixel (i, j) covers source pixels starting at
    offset + (i, j) * factor; integer factors use exact box averaging."""
    if factor == int(factor) and offset == (0.0, 0.0):
        k = int(factor)
        c = src.shape[0]
        block = src[:, : height * k, : width * k].astype(np.float32)
        out = block.reshape(c, height, k, width, k).mean(axis=(2, 4))
        return np.rint(out).astype(src.dtype)
    from skimage.transform import resize

    c = src.shape[0]
    sh = round(height * factor)
    sw = round(width * factor)
    oy, ox = round(offset[0]), round(offset[1])
    crop = src[:, oy : oy + sh, ox : ox + sw]
    out = resize(
        crop.transpose(1, 2, 0),
        (height, width),
        order=1,
        anti_aliasing=factor > 1,
        preserve_range=True,
    )
    return np.rint(out).astype(src.dtype).transpose(2, 0, 1).reshape(c, height, width)


# ------------------------------------------------------------------------------------- opening


class ColourLabelReader(SourceReader):
    """A colour-coded label image (RGB, as aerial datasets ship masks: LoveDA, Potsdam, the seed
    paper's Dubai set) seen as one channel of class values: each pixel's colour looked up in
    ``table`` (0xRRGGBB → value); a colour not in it becomes ``other``, or, when ``other`` is
    None, is an error naming the colour and how many pixels of the region have it."""

    def __init__(self, base: SourceReader, table: dict[int, int], other: int | None) -> None:
        if base.info.channels < 3 or np.dtype(base.info.dtype) != np.uint8:
            raise SourceError(
                base.info.path,
                f"a colour-coded mask must be 8-bit RGB, found {base.info.channels} channel(s) "
                f"of {np.dtype(base.info.dtype)}",
            )
        self.base = base
        self.keys = np.array(sorted(table), dtype=np.int64)
        self.values = np.array([table[k] for k in sorted(table)], dtype=np.uint8)
        self.other = other
        self.read_unit = base.read_unit
        self.info = SourceInfo(
            path=base.info.path,
            channels=1,
            dtype="uint8",
            level_shapes=base.info.level_shapes,
            mpp=base.info.mpp,
            fill_value=0,
            extra=dict(base.info.extra),
        )

    def unknown(self, rgb: np.ndarray) -> dict[int, int]:
        """{0xRRGGBB: pixels} of the colours of ``rgb`` (3, h, w) that the table lacks."""
        codes = _codes(rgb)
        found = np.searchsorted(self.keys, codes).clip(0, max(len(self.keys) - 1, 0))
        missing = codes[self.keys[found] != codes] if len(self.keys) else codes.ravel()
        colours, counts = np.unique(missing, return_counts=True)
        return dict(zip(colours.tolist(), counts.tolist(), strict=True))

    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        rgb = self.base.read_region(level, y, x, height, width)
        codes = _codes(rgb)
        index = np.searchsorted(self.keys, codes).clip(0, len(self.keys) - 1)
        known = self.keys[index] == codes
        out = np.where(known, self.values[index], self.other or 0).astype(np.uint8)
        if self.other is None and not known.all():
            colour, count = max(self.unknown(rgb).items(), key=lambda item: item[1])
            raise SourceError(
                self.info.path,
                f"colour #{colour:06X} ({count} pixels in the region y={y} x={x}) is not a "
                "class of --mask-classes",
            )
        return out[None]

    def close(self) -> None:
        self.base.close()


def _codes(rgb: np.ndarray) -> np.ndarray:
    """0xRRGGBB of every pixel of (c ≥ 3, h, w) uint8 (alpha and further bands ignored)."""
    r, g, b = (rgb[i].astype(np.int64) for i in range(3))
    return (r << 16) | (g << 8) | b

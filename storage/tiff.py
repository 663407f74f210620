"""TIFF, OME-TIFF, BigTIFF and GeoTIFF sources through tifffile: tiled and striped files decode
only the tiles or strips a region touches; pyramids, resolution tags, SVS descriptions and
GeoTIFF keys give levels, µm per pixel and georeferencing."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

from storage.errors import SourceError
from storage.source import (
    DEFAULT_MAX_PIXELS,
    MAX_SEGMENT_BYTES,
    SourceInfo,
    SourceReader,
    check_size,
)

# tifffile logs what it can still recover from; our errors name the file and the problem instead
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


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
        check_size(self.path, *shapes[0], max_pixels)
        # Fast path: one contiguous page per level, decoded segment by segment with pread.
        # Anything else (planar channels, one page per channel) goes through tifffile's Zarr view.
        self._pages: list[Any] = []
        self._arrays: list[Any] = []
        for i, lvl in enumerate(levels):
            page = lvl.keyframe
            self._check_segment(page, shapes[i])
            fast = len(lvl.pages) == 1 and (page.planarconfig == 1 or page.samplesperpixel == 1)
            if fast and (
                len(page.chunked) == 2 or (len(page.chunked) == 3 and page.chunked[2] == 1)
            ):
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
        names = _channel_names(self._tif, series, channels)
        if names:
            extra["channel_names"] = names
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

    def _raw(self, page: Any, index: int) -> bytes | None:
        """Tile or strip ``index`` of ``page`` as stored, None when the file never wrote it."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            return None
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise SourceError(self.path, f"truncated: segment {index} is cut short")
        return data

    def _segment(self, page: Any, index: int) -> np.ndarray | None:
        """One decoded tile or strip as (h, w, c), None when the file never wrote it."""
        data = self._raw(page, index)
        if data is None:
            return None
        seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return seg.reshape(seg.shape[-3:])

    def jpeg_page(self, level: int) -> Any | None:
        """The tifffile page of ``level`` when its tiles are whole JPEG streams a store can
        copy (one page, tiled, JPEG), else None."""
        page = self._pages[level] if level < len(self._pages) else None
        if page is None or page.compression != 7 or not page.is_tiled:
            return None
        return page

    def raw_segment(self, level: int, index: int) -> bytes | None:
        """Tile ``index`` (row-major) of ``level`` as stored, None when the file never wrote it."""
        return self._raw(self._pages[level], index)

    def close(self) -> None:
        self._tif.close()
        os.close(self._fd)


__all__ = ["TiffReader"]


# ------------------------------------------------------------------------------ channel names

#: a colour per channel where the file states none (viewers' usual first colours)
DEFAULT_COLOURS = ("0000FF", "00FF00", "FF0000", "FFFF00", "FF00FF", "00FFFF", "FFFFFF")


def _channel_names(tif: Any, series: Any, channels: int) -> list[dict[str, str]] | None:
    """``label`` and ``color`` (RRGGBB) of each channel of a multiplexed image: an OME-TIFF's
    ``Channel`` elements, or a QPTIFF's per-page ``Name``/``Biomarker`` and ``Color``; None
    for RGB and single-channel images, or a file that names fewer channels than it has."""
    if channels < 2 or (series.axes and "S" in series.axes):
        return None
    found: list[dict[str, str]] = []
    if tif.is_ome and tif.ome_metadata:
        found = _ome_channels(tif.ome_metadata)
    elif getattr(tif, "is_qpi", False):
        pages = [p for p in series.pages if p is not None][:channels]
        found = [c for c in (_qpi_channel(str(p.description or "")) for p in pages) if c]
    if len(found) != channels:
        return None
    for index, channel in enumerate(found):
        channel.setdefault("color", DEFAULT_COLOURS[index % len(DEFAULT_COLOURS)])
    return found


def _ome_channels(xml: str) -> list[dict[str, str]]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []
    image = root.find("{*}Image/{*}Pixels")
    out = []
    for index, channel in enumerate(image.findall("{*}Channel") if image is not None else []):
        entry = {"label": channel.get("Name") or f"channel {index}"}
        colour = channel.get("Color")  # a signed 32-bit RGBA integer
        if colour is not None and colour.lstrip("-").isdigit():
            entry["color"] = f"{(int(colour) & 0xFFFFFFFF) >> 8:06X}"
        out.append(entry)
    return out


def _qpi_channel(description: str) -> dict[str, str] | None:
    """A QPTIFF page's ``<Name>`` (else ``<Biomarker>``) and ``<Color>`` ("r,g,b")."""
    import re
    import xml.etree.ElementTree as ET

    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", description)  # it declares UTF-16; it is text here
    try:
        root = ET.fromstring(text)
    except (ET.ParseError, ValueError):
        return None
    name = root.findtext("Name") or root.findtext("Biomarker")
    if not name:
        return None
    entry = {"label": name.strip()}
    colour = (root.findtext("Color") or "").split(",")
    if len(colour) == 3 and all(c.strip().isdigit() for c in colour):
        entry["color"] = "".join(f"{min(255, int(c)):02X}" for c in colour)
    return entry

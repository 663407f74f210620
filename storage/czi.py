"""Zeiss CZI slides, through pylibCZIrw (ZEISS's own reader; OpenSlide cannot read CZI).

A CZI holds subblocks placed on one plane; a slide scanned in several regions holds one scene
per region. Each scene is an image of its own (``<file>_s<k>``, its bounding rectangle); a file
with a single scene (or none stated) is one image named after the file. Brightfield files
(Bgr24/Bgr48) are read as RGB, fluorescence files (Gray8/Gray16) with one channel per C plane.
The pixel size comes from the metadata's ``Scaling/Items/Distance`` (metres per pixel); the
area of a scene's rectangle that no subblock covers reads as the store's fill value (white for
brightfield, black for fluorescence).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import SourceError
from storage.source import SourceInfo, SourceReader, check_size

SUFFIXES = frozenset({".czi"})
MAGIC = b"ZISRAWFILE"
#: pixel type → (channels per plane, dtype, brightfield)
PIXEL_TYPES = {
    "Bgr24": (3, "uint8", True),
    "Bgr48": (3, "uint16", True),
    "Gray8": (1, "uint8", False),
    "Gray16": (1, "uint16", False),
}


def is_czi(head: bytes) -> bool:
    return head.startswith(MAGIC)


def _open(path: Path) -> Any:
    try:
        from pylibCZIrw import czi as pyczi
    except ImportError:  # pragma: no cover - a declared dependency
        raise SourceError(path, "reading CZI needs pylibCZIrw (pip install pylibCZIrw)") from None
    try:
        return pyczi.CziReader(str(path))
    except Exception as exc:  # the library's own errors: a truncated or damaged file
        raise SourceError(path, f"not a readable CZI file ({type(exc).__name__}: {exc})") from None


def scenes(path: str | Path) -> list[int]:
    """The scene indices of a CZI (empty when the file states none: one image)."""
    reader = _open(Path(path))
    try:
        return sorted(reader.scenes_bounding_rectangle)
    finally:
        reader.close()


class CziReader(SourceReader):
    """One scene of a CZI (or the whole plane), channel first, level 0 only: the tiler builds
    the pyramid from it."""

    fresh_reads = True

    def __init__(self, path: str | Path, max_pixels: int, scene: int | None = None) -> None:
        self.path = Path(path)
        self.scene = scene
        self._reader = _open(self.path)
        self._lock = threading.Lock()  # one decode at a time through the library's handle
        try:
            info = self._describe(max_pixels)
        except Exception:
            self._reader.close()
            raise
        self.info = info

    def _describe(self, max_pixels: int) -> SourceInfo:
        reader, path = self._reader, self.path
        rectangles = reader.scenes_bounding_rectangle
        if self.scene is not None:
            if self.scene not in rectangles:
                raise SourceError(path, f"has no scene {self.scene} (scenes: {sorted(rectangles)})")
            rect = rectangles[self.scene]
        else:
            rect = reader.total_bounding_rectangle
        self.origin = (rect.y, rect.x)
        types = set(reader.pixel_types.values())
        if len(types) != 1 or next(iter(types)) not in PIXEL_TYPES:
            raise SourceError(
                path, f"pixel type {sorted(types)} is not supported (Bgr24/48, Gray8/16)"
            )
        pixel_type = next(iter(types))
        per_plane, dtype, brightfield = PIXEL_TYPES[pixel_type]
        self.pixel_type = pixel_type
        self.planes = sorted(reader.pixel_types)  # C indices
        if brightfield and len(self.planes) > 1:
            raise SourceError(
                path, f"{len(self.planes)} colour planes of {pixel_type}: one expected"
            )
        check_size(str(path), rect.h, rect.w, max_pixels)
        channels = per_plane * len(self.planes)
        fill = (255 if dtype == "uint8" else 65535) if brightfield else 0
        return SourceInfo(
            path=str(path),
            channels=channels,
            dtype=dtype,
            level_shapes=((rect.h, rect.w),),
            mpp=_mpp(reader.metadata),
            fill_value=fill,
            extra={"vendor": "zeiss-czi", "scene": self.scene, "pixel_type": pixel_type},
        )

    def _read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        top, left = self.origin
        roi = (left + x, top + y, width, height)
        fill = float(self.info.fill_value)
        planes = []
        with self._lock:
            for c in self.planes:
                data = self._reader.read(
                    roi=roi,
                    plane={"C": c, "Z": 0, "T": 0},
                    scene=self.scene,
                    background_pixel=(fill, fill, fill),
                )
                planes.append(data)
        if self.info.channels == 3 and len(planes) == 1:  # the library gives B, G, R
            return np.ascontiguousarray(planes[0][..., ::-1].transpose(2, 0, 1))
        return np.stack([p.reshape(height, width) for p in planes])

    def close(self) -> None:
        self._reader.close()


def _mpp(metadata: Any) -> float | None:
    """µm per pixel from ``ImageDocument/Metadata/Scaling/Items/Distance[@Id=X]`` (metres)."""
    try:
        items = metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
        items = items if isinstance(items, list) else [items]
        value = next(float(d["Value"]) for d in items if d.get("@Id") == "X")
    except (KeyError, TypeError, ValueError, StopIteration):
        return None
    return value * 1e6 if value > 0 else None

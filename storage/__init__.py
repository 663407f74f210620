"""hiresctl's storage layer: readers, the dataset store, the tiler and the synthesizers.

This package never imports torch (a test checks it), so tiling runs anywhere. Its names load
on first use: ``from storage.errors import UsageError`` (or ``from storage import UsageError``)
imports no reader, store or tiler, and so neither zarr nor numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from storage.errors import HiresError, SourceError, StoreError, UsageError

if TYPE_CHECKING:
    from storage.readers import SourceReader, open_source
    from storage.store import FORMAT_VERSION, Dataset, ImageEntry
    from storage.synth import SYNTHESIZERS, synthesize
    from storage.tiler import ImageResult, LabelTable, SourceSpec, TileOptions, tile

_LAZY = {
    "SourceReader": "storage.readers",
    "open_source": "storage.readers",
    "FORMAT_VERSION": "storage.store",
    "Dataset": "storage.store",
    "ImageEntry": "storage.store",
    "SYNTHESIZERS": "storage.synth",
    "synthesize": "storage.synth",
    "ImageResult": "storage.tiler",
    "LabelTable": "storage.tiler",
    "SourceSpec": "storage.tiler",
    "TileOptions": "storage.tiler",
    "tile": "storage.tiler",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'storage' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "SYNTHESIZERS",
    "Dataset",
    "HiresError",
    "ImageEntry",
    "ImageResult",
    "LabelTable",
    "SourceError",
    "SourceReader",
    "SourceSpec",
    "StoreError",
    "TileOptions",
    "UsageError",
    "open_source",
    "synthesize",
    "tile",
]

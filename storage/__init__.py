"""hiresctl's storage layer: readers, the dataset store, the tiler and the synthesizers.

This package never imports torch (a test checks it), so tiling runs anywhere.
"""

from storage.errors import HiresError, SourceError, StoreError, UsageError
from storage.readers import SourceReader, open_source
from storage.store import FORMAT_VERSION, Dataset, ImageEntry
from storage.synth import SYNTHESIZERS, synthesize
from storage.tiler import ImageResult, LabelTable, SourceSpec, TileOptions, tile

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

"""Patch features computed once (``hiresctl embed``) for the feature methods and other tools."""

from hiresctl.features.embed import (
    DTYPES,
    EmbedOptions,
    EmbedResult,
    choose_level,
    embed_store,
    export_h5,
    export_stamp,
    weights_checksum,
)

__all__ = [
    "DTYPES",
    "EmbedOptions",
    "EmbedResult",
    "choose_level",
    "embed_store",
    "export_h5",
    "export_stamp",
    "weights_checksum",
]

"""OME-NGFF label images as the product writes them (tiling's masks, ``predict``'s masks):
their ``image-label`` metadata, colours and pyramid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.pyramid import halve_mode, level_shapes
from storage.store import (
    image_multiscales,
)

PALETTE = [
    [0, 0, 0, 0],
    [255, 64, 64, 160],
    [64, 160, 255, 160],
    [255, 200, 0, 160],
    [160, 64, 255, 160],
    [0, 200, 120, 160],
    [255, 120, 200, 160],
    [120, 120, 120, 160],
]


def label_image_attrs(
    name: str,
    level_scales: list[tuple[float, float]],
    mpp: float | None,
    values: Sequence[int],
    classes: dict[int, str],
    colours: dict[int, int] | None = None,
    source: str = "../../",
) -> dict[str, Any]:
    """NGFF 0.5 ``ome`` attribute of a multiscale label image: scales, colours (a value's own
    0xRRGGBB from ``colours`` where the masks were colour-coded, else the palette), names."""
    meta = image_multiscales(name, level_scales, mpp)
    own = colours or {}

    def rgba(i: int, value: int) -> list[int]:
        if value in own:
            code = own[value]
            return [code >> 16 & 255, code >> 8 & 255, code & 255, 255]
        return PALETTE[i % len(PALETTE)]

    meta["image-label"] = {
        "version": "0.5",
        "colors": [{"label-value": int(v), "rgba": rgba(i, int(v))} for i, v in enumerate(values)],
        "properties": [
            {"label-value": int(v), "class": classes.get(int(v), str(v))} for v in values
        ],
        "source": {"image": source},
    }
    return meta


def label_pyramid(
    group: zarr.Group, thumbnail: int = 1024, block: int = 2048
) -> list[tuple[int, int]]:
    """Add levels 1, 2, … to the label image whose level ``0`` is in ``group``: each the 2×2
    mode of the one before, streamed ``block`` pixels at a time, until the longest side is
    ≤ ``thumbnail``. Returns the (height, width) of every level."""
    base: Any = group["0"]
    channels, height, width = base.shape
    shapes = level_shapes(height, width, thumbnail)
    for level in range(1, len(shapes)):
        source: Any = group[str(level - 1)]
        lh, lw = shapes[level]
        chunk = min(base.chunks[1], max(lh, lw))
        target = group.create_array(
            str(level),
            shape=(channels, lh, lw),
            dtype=base.dtype,
            chunks=(channels, chunk, chunk),
            fill_value=0,
            dimension_names=("c", "y", "x"),
            compressors=[ZstdCodec(level=3)],
            overwrite=True,
        )
        sh, sw = shapes[level - 1]
        for y in range(0, sh, block):
            for x in range(0, sw, block):
                halved = halve_mode(np.asarray(source[:, y : y + block, x : x + block]))
                target[
                    :,
                    y // 2 : y // 2 + halved.shape[1],
                    x // 2 : x // 2 + halved.shape[2],
                ] = halved
    return shapes
